"""The one way a run is built from a :class:`jrft.config.RunConfig`: mesh, tokenizer, data, model, optimizer
and placed train state (:func:`setup_run`), used by every objective's runner and by ``jrft export``; and the
pieces of a config that the engine needs as plain values (reward runner, checkpointer, memory estimate).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jrft.config import MeshConfig, RunConfig
from jrft.train.checkpoint import Checkpointer
from jrft.train.objectives import dpo
from jrft.train.optim import make_optimizer
from jrft.train.placement import place_state
from jrft.train.rounds import RoundOptions
from jrft.train.state import create_train_state


def mesh_from_config(mesh: MeshConfig) -> Mesh:
    """The run's mesh from the ``mesh`` section. With no ``-1`` axis and fewer devices asked for than exist,
    the first ``data * fsdp * tensor`` devices are used (e.g. ``mesh.data=1`` for a single-device run)."""
    from jrft.parallel import make_mesh

    sizes = dict(data=mesh.data, fsdp=mesh.fsdp, tensor=mesh.tensor)
    if -1 not in sizes.values():
        wanted = mesh.data * mesh.fsdp * mesh.tensor
        if wanted < jax.device_count():
            return make_mesh(**sizes, devices=jax.devices()[:wanted])
    return make_mesh(**sizes)


def build_model(config: RunConfig, mesh: Mesh, *, scalar_head: bool = False, path: str | None = None):
    """The run's model (``config.model``, with LoRA adapters when ``lora.rank > 0``, fresh or read from
    ``lora.init_from``: the train state's params are then only the adapters), or another checkpoint ``path``
    with the same dtype/remat settings (PPO's value and reward models, without adapters)."""
    from jrft.models import from_pretrained
    from jrft.models.lora import LoRASpec

    m = config.model
    return from_pretrained(
        path or m.path,
        mesh=mesh,
        dtype=jnp.dtype(m.dtype),
        param_dtype=jnp.dtype(m.param_dtype),
        remat=m.remat,
        scalar_head=scalar_head,
        seed=config.seed,
        lora=LoRASpec.from_config(config.lora) if path is None else None,
        lora_init=config.lora.init_from if path is None and config.lora.rank > 0 else None,
        base_quantization=config.lora.base_quantization if path is None else None,
        # a reward model in training scores as its run says; one loaded by path as it was saved
        reward_likelihood_coef=(
            config.reward.likelihood_coef
            if scalar_head and path is None and config.objective == "reward"
            else None
        ),
    )


def optimizer_from_config(config: RunConfig, *, total_steps: int):
    """``(optax transformation, schedule)`` of the config's ``optim`` section over ``total_steps`` updates."""
    o = config.optim
    return make_optimizer(
        lr=o.lr,
        total_steps=total_steps,
        warmup_steps=o.warmup_steps,
        schedule=o.schedule,
        min_lr_ratio=o.min_lr_ratio,
        weight_decay=o.weight_decay,
        b1=o.betas[0],
        b2=o.betas[1],
        eps=o.eps,
        max_grad_norm=o.max_grad_norm,
    )


def total_updates(config: RunConfig) -> int:
    """Optimizer steps of the whole run (the schedule's length): one per loop step offline; GRPO and PPO
    take ``iterations x mini-batches`` per round."""
    steps = config.train.steps
    if config.objective == "grpo":
        return steps * config.grpo.num_iterations * config.grpo.num_mini_batches
    if config.objective == "ppo":
        return steps * config.ppo.num_epochs * config.ppo.num_mini_batches
    return steps


@dataclasses.dataclass
class Run:
    """A built run: everything the objective's runner hands to the engine.

    ``state`` is the placed :class:`jrft.train.state.TrainState` of the trained model (the policy for GRPO
    and PPO) and ``shardings`` its jit shardings; ``schedule(update) -> lr``.
    """

    config: RunConfig
    mesh: Mesh
    tokenizer: Any
    train_ds: Any
    eval_ds: Any
    graphdef: Any
    state: Any
    shardings: Any
    tx: Any
    schedule: Any


def setup_run(
    config: RunConfig, *, scalar_head: bool = False, data: bool = True, mesh: Mesh | None = None
) -> Run:
    """Builds the run of ``config``: its mesh (or ``mesh``), tokenizer, train/eval datasets (``data=False``:
    none, e.g. for export), the model with a scalar head when ``scalar_head``, the optimizer over
    :func:`total_updates` and the train state placed on the mesh."""
    from transformers import AutoTokenizer

    from jrft.data import datasets_from_config

    mesh = mesh if mesh is not None else mesh_from_config(config.mesh)
    tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer_path)
    train_ds, eval_ds = datasets_from_config(config, tokenizer) if data else (None, None)
    tx, schedule = optimizer_from_config(config, total_steps=total_updates(config))
    graphdef, state = create_train_state(
        build_model(config, mesh, scalar_head=scalar_head), tx, seed=config.seed
    )
    state, shardings = place_state(state, mesh)
    return Run(config, mesh, tokenizer, train_ds, eval_ds, graphdef, state, shardings, tx, schedule)


def reward_runner_from_config(
    section, *, group_size: int, max_new_tokens: int, mesh: Mesh | None = None, dtype: str = "float32"
):
    """A ``RewardRunner`` for the ``grpo`` / ``ppo`` section's reward settings; DAPO's soft overlong penalty
    is added as one more reward function when the section has ``overlong_buffer`` > 0. Reward-model
    entries are loaded onto ``mesh`` (in ``dtype``) and run in threads of the runner."""
    from jrft.rewards import RewardRunner
    from jrft.rewards.registry import build_reward
    from jrft.train.reward_model_fn import load_reward_model_function

    entries = [f.as_runner_spec() for f in section.reward_functions]
    buffer = getattr(section, "overlong_buffer", 0)
    if buffer:
        entries.append(
            {
                "name": "soft_overlong",
                "weight": getattr(section, "overlong_penalty", 1.0),
                "max_length": max_new_tokens,
                "cache_length": buffer,
            }
        )
    options = dict(timeout=section.reward_timeout_s, combine=section.reward_combine, group_size=group_size)
    if not any("reward_model" in e for e in entries):
        return RewardRunner.from_config(entries, **options)
    functions, weights, names, processes = [], [], [], []
    for i, entry in enumerate(entries):
        if "reward_model" in entry:
            label = entry["label"] or "reward_model"
            functions.append(
                load_reward_model_function(entry["reward_model"], mesh=mesh, dtype=dtype, name=label)
            )
            weights.append(entry["weight"])
            names.append(label)
            continue
        built = build_reward(entry, where=f"rewards[{i}]")
        functions.append(built.function)
        weights.append(built.weight)
        names.append(built.label)
        if built.process:
            processes.append(built.label)
    return RewardRunner(functions, weights=weights, names=names, processes=processes, **options)


def rl_eval_fn(config: RunConfig, run, section, graphdef, params_of, *, num_generations: int):
    """``state -> metrics`` evaluating the policy on ``data.eval`` (``jrft.train.rl_eval``) for GRPO / PPO,
    or None without eval data. ``params_of(state) -> (params, rest)`` picks the policy out of the state."""
    import jax
    from flax import nnx

    from jrft.data import eval_batches_from_config, pad_token_id
    from jrft.train.rl_eval import evaluate_policy
    from jrft.train.rollout import SamplingSettings

    c = section
    if run.eval_ds is None or not c.reward_functions:  # PPO with a reward model only: not built yet
        return None
    runner = reward_runner_from_config(
        c, group_size=1, max_new_tokens=c.max_new_tokens, mesh=run.mesh, dtype=config.model.dtype
    )
    sampling = SamplingSettings(
        num_generations, c.max_new_tokens, c.temperature, c.top_k, c.top_p, pad_token_id(run.tokenizer)
    )
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())

    def evaluate(state):
        params, rest = params_of(state)
        return evaluate_policy(
            nnx.merge(graphdef, params, rest),
            eval_batches_from_config(config, run.eval_ds, **where),
            run.tokenizer,
            runner,
            sampling=sampling,
            rng=jax.random.key(config.seed + 7),
            mesh=run.mesh,
            pass_threshold=c.eval_pass_threshold,
        )

    return evaluate


def round_options(
    config: RunConfig,
    mesh: Mesh,
    *,
    state_sharding,
    num_mini_batches: int,
    pad_token_id: int = 0,
    model_cfg=None,
    hbm_bytes: int | None = None,
) -> RoundOptions:
    """The options of a GRPO / PPO round (``jrft.train.rounds.RoundOptions``) from the config: micro-batches
    by ``train.micro_batch_size`` over the prompts of one mini-batch, the completions table in the run's
    directory, the memory levers of the ``train`` section (for the runners and for ``jrft compile``).
    ``model_cfg`` (default: read from ``model.path``) and ``hbm_bytes`` (default: what the mesh's devices
    report) decide ``train.sampler_weights: auto`` (:func:`sampler_gathers_weights`)."""
    t = config.train
    if model_cfg is None and os.path.isdir(config.model.path):
        from jrft.models import ModelConfig

        model_cfg = ModelConfig.from_hf(config.model.path)
    mesh_shape = [mesh.shape[a] for a in ("data", "fsdp", "tensor")]
    platform = mesh.devices.flat[0].platform
    hbm = device_memory_bytes(mesh) if hbm_bytes is None else hbm_bytes
    return RoundOptions(
        mesh=mesh,
        state_sharding=state_sharding,
        pad_token_id=pad_token_id,
        grad_accum=t.grad_accum_for(t.batch_size // num_mini_batches),
        completions_path=os.path.join(config.output_dir, "completions.jsonl"),
        logits_chunk_size=t.logits_chunk_size,
        offload_reference=t.offload_reference,
        pack_rows=t.pack_rows,
        gather_sampler_weights=sampler_gathers_weights(
            config, model_cfg, mesh_shape, platform=platform, hbm_bytes=hbm
        ),
    )


def device_memory_bytes(mesh: Mesh) -> int | None:
    """The memory one device of ``mesh`` has: ``bytes_limit`` of its ``memory_stats``; for the device-less
    TPU devices of an AOT topology, the compiler's usable HBM (``jrft.aot.chip_hbm_bytes``); None where the
    device does not say (CPU)."""
    device = mesh.devices.flat[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - device-less topology devices cannot be asked
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "tpu":
        from jrft.aot.topology import chip_hbm_bytes

        return chip_hbm_bytes(list(mesh.devices.flat))
    return None


def sampler_gathers_weights(config: RunConfig, model_cfg, mesh_shape, *, platform: str, hbm_bytes) -> bool:
    """``train.sampler_weights`` resolved: ``auto`` gathers when the sampler's estimate with the gathered
    weights (:func:`run_estimates`) fits in 90% of ``hbm_bytes``, and always where the device memory is
    unknown (``hbm_bytes`` None: CPU) or the model's shape is (``model_cfg`` None)."""
    choice = config.train.sampler_weights
    if choice != "auto":
        return choice == "gathered"
    if hbm_bytes is None or model_cfg is None:
        return True
    sampler = _sampler_bytes(config, model_cfg, mesh_shape, platform=platform, gathered=True)
    return sampler <= 0.9 * hbm_bytes


def checkpointer_for(config: RunConfig) -> Checkpointer:
    """The run's checkpointer; refuses to silently restart over old checkpoints when resume is off."""
    checkpointer = Checkpointer(
        os.path.join(config.output_dir, "checkpoints"), keep_last=config.train.keep_last
    )
    if not config.train.resume and checkpointer.latest_step() is not None:
        raise FileExistsError(
            f"{checkpointer.directory} holds checkpoints but train.resume=false: "
            "choose a new output_dir or set train.resume=true"
        )
    return checkpointer


def lora_base_reference(config: RunConfig) -> dict | None:
    """What a LoRA run's checkpoints record of the base they leave out: ``{"path": model.path, "bytes",
    "sha256"}`` (``jrft.models.pretrained.weights_fingerprint``); None without LoRA."""
    if config.lora.rank == 0:
        return None
    from jrft.models.pretrained import weights_fingerprint

    return {"path": config.model.path, **weights_fingerprint(config.model.path)}


def export_dir(config: RunConfig) -> str:
    """Where the run's final transformers-format model goes."""
    return config.train.export_dir or os.path.join(config.output_dir, "export")


def holds_reference(config: RunConfig) -> bool:
    """Whether the run keeps a frozen reference copy of the parameters (for the memory estimate). With LoRA
    it never does: the reference is the base with the adapters off."""
    if config.lora.rank > 0:
        return False
    if config.objective == "dpo":
        d = config.dpo
        return not (d.reference_free or d.precompute_ref_logps or not dpo.needs_reference(d.loss_type))
    if config.objective == "kto":
        return not config.kto.precompute_ref_logps
    if config.objective == "grpo":
        return config.grpo.beta > 0
    if config.objective == "ppo":
        return config.ppo.kl_coef > 0
    return False


def estimate_for(
    config: RunConfig,
    model_cfg,
    mesh_shape,
    *,
    rows: int,
    cache_rows: int = 0,
    cache_len: int = 0,
    seq_len: int | None = None,
    platform: str = "cpu",
    completion_logps: bool = False,
):
    """The per-device memory estimate (``jrft.parallel.memory.estimate_memory``) of a run of ``config`` with
    model architecture ``model_cfg`` on a mesh of ``mesh_shape`` (data, fsdp, tensor) of ``platform``
    devices: ``rows`` batch rows per update (``train.micro_batch_size`` caps them; a preference pair is
    two sequences) of ``seq_len`` tokens (default ``data.max_length``), ``cache_rows`` x ``cache_len`` KV
    cache. With LoRA (``lora.rank > 0``) gradients and optimizer moments are the adapters' only."""
    from jrft.models.lora import LoRASpec, adapter_param_count
    from jrft.models.quant import quantized_counts
    from jrft.parallel.memory import estimate_memory

    nbytes = lambda name: jnp.dtype(name).itemsize  # noqa: E731
    spec = LoRASpec.from_config(config.lora)
    micro = config.train.micro_batch_size or rows
    # chosen and rejected (KTO: the completion and its KL pair) in one forward
    pairs = 2 if config.objective in ("dpo", "reward", "kto") else 1
    return estimate_memory(
        model_cfg,
        mesh_shape=tuple(mesh_shape),
        batch=min(micro, rows) * pairs,
        seq_len=seq_len or config.data.max_length,
        param_bytes=nbytes(config.model.param_dtype),
        compute_bytes=nbytes(config.model.dtype),
        opt_bytes=nbytes(config.model.param_dtype),
        remat=config.model.remat,
        cache_batch=cache_rows,
        cache_len=cache_len,
        cache_bytes=nbytes(config.model.dtype),
        logits_chunk_size=config.train.logits_chunk_size,
        reference=holds_reference(config),
        offload_reference=config.train.offload_reference,
        platform=platform,
        completion_logps=completion_logps,
        adapter_params=adapter_param_count(model_cfg, spec) if spec is not None else 0,
        quantized=quantized_counts(model_cfg, config.lora.base_quantization),
    )


def run_estimates(config: RunConfig, model_cfg, mesh_shape, *, platform: str, hbm_bytes=None) -> dict:
    """jrft's per-device estimates of a run's biggest programs: ``{"step": MemoryEstimate}`` (the train step,
    or the GRPO / PPO update over one mini-batch of rollout rows) and, for GRPO / PPO, ``"sampler"``: bytes
    of the sampler beside the train state it runs with (:func:`_sampler_bytes`, with the weights gathered
    or not as :func:`sampler_gathers_weights` decides for a device of ``hbm_bytes``). ``jrft compile`` prints
    them beside the compiled totals; every run prints them at start."""
    if config.objective not in ("grpo", "ppo"):
        return {
            "step": estimate_for(
                config, model_cfg, mesh_shape, rows=config.train.batch_size, platform=platform
            )
        }
    step = dataclasses.replace(
        _rollout_estimate(config, model_cfg, mesh_shape, platform=platform), kv_cache=0
    )
    gathered = sampler_gathers_weights(config, model_cfg, mesh_shape, platform=platform, hbm_bytes=hbm_bytes)
    sampler = _sampler_bytes(config, model_cfg, mesh_shape, platform=platform, gathered=gathered)
    return {"step": step, "sampler": sampler}


def _rollout_estimate(config: RunConfig, model_cfg, mesh_shape, *, platform: str):
    c = getattr(config, config.objective)
    rows = config.train.batch_size * getattr(c, "num_generations", 1)
    cache_len = config.data.max_prompt_length + c.max_new_tokens
    return estimate_for(
        config,
        model_cfg,
        mesh_shape,
        rows=rows // c.num_mini_batches,
        cache_rows=rows,
        cache_len=cache_len,
        seq_len=cache_len,  # rollout rows: prompt then completion
        platform=platform,
        completion_logps=True,
    )


def _sampler_bytes(config: RunConfig, model_cfg, mesh_shape, *, platform: str, gathered: bool) -> int:
    """Per-device bytes of the GRPO / PPO sampler beside the train state it runs with: parameters,
    optimizer moments, reference, KV cache, and either the weights gathered whole over fsdp (compute
    dtype, tensor split kept) or, left sharded, two layers' gathered weights at a time."""
    est = _rollout_estimate(config, model_cfg, mesh_shape, platform=platform)
    _, fsdp, tensor = mesh_shape
    compute = jnp.dtype(config.model.dtype).itemsize
    whole = model_cfg.num_params * compute // tensor
    if config.lora.base_quantization != "none":  # gathered as stored: the projections' codes, their scales
        from jrft.models.quant import quantized_counts

        weights, code_bytes, scales = quantized_counts(model_cfg, config.lora.base_quantization)
        whole = ((model_cfg.num_params - weights) * compute + code_bytes + scales * compute) // tensor
    if fsdp == 1:
        weights = 0
    elif gathered:
        weights = whole
    else:
        weights = 2 * whole // max(model_cfg.num_layers, 1)
    # XLA decode step: 3 caches at the peak (measured on the TPU compiler, Llama-3 1B and 8B): the sampler
    # grows its cache segment by segment, and the last growth holds the old cache, the grown one and the
    # loop's copy. Ragged decode kernel (TPU): one cache allocated whole, laid out slots-minor when head_dim
    # is under 128 lanes, so without the lane padding ``estimate_for`` counts (scripts/decode_memory.py).
    caches = 3 * est.kv_cache
    if _ragged_decode(model_cfg, platform):
        lanes = -(-model_cfg.head_dim // 128) * 128 if platform == "tpu" else model_cfg.head_dim
        caches = est.kv_cache * model_cfg.head_dim // lanes
    return est.params + est.optimizer + est.reference + caches + weights


def _ragged_decode(model_cfg, platform: str) -> bool:
    """Whether the sampler's decode step uses the ragged decode kernel (``kernels.decode_attention_impl``
    for the scan layout an accelerator gets, unless ``JRFT_ATTENTION=xla``)."""
    from jrft.models import kernels

    choice = kernels.decode_attention_impl(
        platform, q_heads=model_cfg.num_heads, kv_heads=model_cfg.num_kv_heads, layout="scan"
    )
    return kernels.forced(choice).impl == kernels.RAGGED_DECODE


def memory_summary(config: RunConfig, mesh: Mesh, state) -> str:
    """The per-device memory estimates (:func:`run_estimates`) and, beside them, what the parameters really
    occupy per device and what the device reports in use (where it can)."""
    from jrft.models import ModelConfig
    from jrft.parallel.memory import actual_param_bytes_per_device, device_memory_in_use

    if not os.path.isdir(config.model.path):
        return "memory estimate: skipped (model config not in a local directory)"
    mesh_shape = [mesh.shape[a] for a in ("data", "fsdp", "tensor")]
    platform = mesh.devices.flat[0].platform
    estimates = run_estimates(
        config,
        ModelConfig.from_hf(config.model.path),
        mesh_shape,
        platform=platform,
        hbm_bytes=device_memory_bytes(mesh),
    )
    text = estimates["step"].describe()
    if "sampler" in estimates:
        text += f"; sampler {estimates['sampler'] / 2**30:.2f} GiB"
    actual = actual_param_bytes_per_device(state.params)
    reported = device_memory_in_use()
    tail = f"; device reports {reported / 2**30:.2f} GiB in use" if reported else ""
    text += f"; parameters actually {actual / 2**30:.3f} GiB/device{tail}"
    return text + " (jrft compile gives the compiler's own figures)"
