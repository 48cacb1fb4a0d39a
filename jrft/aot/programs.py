"""A run's jitted programs, built abstractly for AOT compilation (``jrft compile``): the same builders the
runners use (``make_train_step`` + ``jit_step``, ``grpo_round.update_step``, ``ppo_round.update_steps``,
``make_completion_forward``, the sampler's ``Sampler.lower``, ``FrozenModel``'s host-to-device program), fed
``ShapeDtypeStruct``s with the run's shardings instead of arrays. Only the model's ``config.json`` is needed
(or a preset name, :mod:`jrft.aot.presets`): no weights, data or tokenizer.

Shapes are the largest a run of the config can feed: ``train.batch_size`` rows of ``data.max_length`` tokens
offline; for GRPO / PPO, the sampler's ``batch_size`` prompts of ``data.max_prompt_length`` tokens with
``num_generations`` samples, and update mini-batches of rollout rows ``[max_prompt_length | max_new_tokens]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jrft.aot.compile import abstract
from jrft.config import RunConfig
from jrft.parallel import state_shardings
from jrft.sampling import bucket_length
from jrft.train.placement import batch_sharding
from jrft.train.state import TrainState, split_model


@dataclasses.dataclass
class Program:
    """One program of a run: ``fn.lower(*args)`` lowers it (under the mesh); ``resident_bytes`` are the
    per-chip bytes of device arrays the run holds while it runs that are not among its arguments;
    ``estimate_bytes`` is jrft's own estimate for it."""

    name: str
    fn: Any
    args: tuple
    resident_bytes: int = 0
    estimate_bytes: int | None = None


class _Lowered:
    """Adapts a function that returns a ``Lowered`` to the ``fn.lower(*args)`` form."""

    def __init__(self, lower):
        self._lower = lower

    def lower(self, *args):
        return self._lower()


def device_bytes(tree) -> int:
    """Per-chip bytes of the device-memory leaves of an abstract pytree (host-memory leaves count 0)."""
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if sharding is not None and getattr(sharding, "memory_kind", None) == "pinned_host":
            continue
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def abstract_train_state(
    config: RunConfig, model_cfg, tx, mesh: Mesh, *, scalar_head: bool = False, trained: bool = True
):
    """``(graphdef, abstract TrainState, shardings)``: the run's model and optimizer state as
    ``ShapeDtypeStruct``s placed as ``place_state`` would place them. The ``trained`` model (the policy, not
    PPO's value or reward model) gets the ``lora`` section's adapters, as ``build_model`` gives it."""
    from jrft.models import Decoder
    from jrft.models.lora import LoRASpec

    m = config.model
    model = nnx.eval_shape(
        lambda: Decoder(
            model_cfg,
            rngs=nnx.Rngs(config.seed),
            dtype=jnp.dtype(m.dtype),
            param_dtype=jnp.dtype(m.param_dtype),
            remat=m.remat,
            scalar_head=scalar_head,
            lora=LoRASpec.from_config(config.lora) if trained else None,
            base_quantization=config.lora.base_quantization if trained else None,
        )
    )
    graphdef, params, rest = split_model(model)
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        rest=rest,
        opt_state=jax.eval_shape(tx.init, params),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    shardings = state_shardings(state, mesh)
    return graphdef, abstract(state, shardings), shardings


def abstract_batch(
    mesh: Mesh, spec: dict[str, tuple[tuple[int, ...], Any]]
) -> dict[str, jax.ShapeDtypeStruct]:
    """``{name: (shape, dtype)}`` -> ``ShapeDtypeStruct``s sharded over the batch axis as ``device_batch``
    shards real batches."""
    return {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, shape))
        for k, (shape, dtype) in spec.items()
    }


def _on_host(tree):
    """The same abstract arrays in ``pinned_host`` memory (``train.offload_reference``)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding.with_memory_kind("pinned_host")),
        tree,
    )


def _pairs_spec(b: int, t: int, *, reference: bool) -> dict:
    spec = {"group": ((b,), jnp.int32)}
    for side in ("chosen", "rejected"):
        for key in ("tokens", "attention_mask", "loss_mask", "positions"):
            spec[f"{side}_{key}"] = ((b, t), jnp.int32)
    if reference:
        spec.update(ref_chosen_logps=((b,), jnp.float32), ref_rejected_logps=((b,), jnp.float32))
    return spec


def _rollout_spec(n: int, tp: int, tc: int, **extra) -> dict:
    spec = {
        "tokens": ((n, tp + tc), jnp.int32),
        "attention_mask": ((n, tp + tc), jnp.int32),
        "completion_mask": ((n, tc), jnp.int32),
    }
    spec.update({k: ((n, tc) if per_token else (n,), jnp.float32) for k, per_token in extra.items()})
    return spec


def _ref_offloaded(config: RunConfig) -> bool:
    """Whether the reference parameters live in host memory: ``train.offload_reference``, except under LoRA,
    whose reference is zero adapters (tiny, kept on the device) over the train state's own base."""
    return config.train.offload_reference and config.lora.rank == 0


def _reference_program(name, forward, graphdef_state, batch, *, offload: bool, resident: int) -> Program:
    """The frozen reference's forward over ``batch``: on the device, or (offloaded) the host-to-device
    program ``FrozenModel`` runs."""
    from jrft.train.reference import from_host

    params, rest = graphdef_state
    if not offload:
        return Program(name, forward, (params, rest, batch), resident_bytes=resident)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    return Program(
        name, from_host(forward, shardings), (_on_host(params), rest, batch), resident_bytes=resident
    )


def offline_programs(config: RunConfig, model_cfg, mesh: Mesh) -> list[Program]:
    """SFT / reward model / DPO: the train step (and DPO's live reference forward)."""
    from jrft.train.objectives import dpo
    from jrft.train.runs.offline import lora_reference_loss, offline_loss
    from jrft.train.runs.setup import holds_reference, optimizer_from_config, total_updates
    from jrft.train.step import jit_step, make_train_step

    if config.objective == "reward" and config.reward.loss == "listwise":
        raise NotImplementedError("jrft compile: the listwise reward model is not built for compile yet")
    b, t = config.train.batch_size, config.data.max_length
    tx, _ = optimizer_from_config(config, total_steps=total_updates(config))
    graphdef, state, shardings = abstract_train_state(
        config, model_cfg, tx, mesh, scalar_head=config.objective == "reward"
    )
    normalizers, loss_fn = offline_loss(config)
    d = config.dpo
    # LoRA's DPO reference: the base with the adapters off, inside the step (as the runner builds it)
    live_lora_reference = (
        config.objective == "dpo"
        and config.lora.rank > 0
        and not (d.reference_free or d.precompute_ref_logps or not dpo.needs_reference(d.loss_type))
    )
    if live_lora_reference:
        loss_fn = lora_reference_loss(config, graphdef, loss_fn)
    step = jit_step(
        make_train_step(graphdef, loss_fn, normalizers, tx, grad_accum=config.train.grad_accum),
        mesh=mesh,
        state_sharding=shardings,
    )
    if config.objective == "sft":
        keys = ("tokens", "attention_mask", "loss_mask", "positions", "segment_ids")
        batch = abstract_batch(mesh, {k: ((b, t), jnp.int32) for k in keys})
    else:
        pairs = _pairs_spec(b, t, reference=config.objective == "dpo" and not live_lora_reference)
        batch = abstract_batch(mesh, pairs)
    reference = config.objective == "dpo" and holds_reference(config)
    ref_bytes = device_bytes(state.params) if reference and not config.train.offload_reference else 0
    programs = [Program(f"{config.objective}/train_step", step, (state, batch), resident_bytes=ref_bytes)]
    if reference:
        forward = dpo.make_reference_fn(graphdef, logits_chunk_size=config.train.logits_chunk_size)
        pairs = {k: v for k, v in batch.items() if not k.startswith("ref_")}
        programs.append(
            _reference_program(
                "dpo/reference",
                forward,
                (state.params, state.rest),
                pairs,
                offload=config.train.offload_reference,
                resident=device_bytes(state),  # the train state stays on the device meanwhile
            )
        )
    return programs


def _generate_program(
    config: RunConfig, graphdef, state, mesh: Mesh, resident: int, *, gather_weights: bool
) -> Program:
    """The sampler over ``train.batch_size`` prompts of ``data.max_prompt_length`` tokens, with the
    objective section's sampling settings (G samples per prompt for GRPO, one for PPO) and weights gathered
    or not as the round would (``RoundOptions.gather_sampler_weights``)."""
    from jrft.sampling.generate import Sampler

    section = getattr(config, config.objective)
    prompts, prompt_length = config.train.batch_size, config.data.max_prompt_length
    samples = getattr(section, "num_generations", 1)
    name = f"{config.objective}/generate"

    model = nnx.split(nnx.merge(graphdef, state.params, state.rest))

    def lower():
        return Sampler().lower(
            model,
            prompts,
            prompt_length,
            max_new_tokens=section.max_new_tokens,
            num_samples=samples,
            temperature=section.temperature,
            top_k=section.top_k,
            top_p=section.top_p,
            mesh=mesh,
            gather_weights=gather_weights,
        )

    return Program(name, _Lowered(lower), (), resident_bytes=resident)


def grpo_programs(config: RunConfig, model_cfg, mesh: Mesh) -> list[Program]:
    """GRPO: the sampler (prefill + decode over the KV cache, G samples per prompt), the update, and the
    old / reference log-prob forwards where the config computes them."""
    from jrft.train.grpo_round import on_policy, update_step
    from jrft.train.logprobs import make_completion_forward
    from jrft.train.runs.setup import optimizer_from_config, round_options, total_updates

    c, t = config.grpo, config.train
    tx, _ = optimizer_from_config(config, total_steps=total_updates(config))
    graphdef, state, shardings = abstract_train_state(config, model_cfg, tx, mesh)
    tp, tc = bucket_length(config.data.max_prompt_length), c.max_new_tokens
    n = t.batch_size * c.num_generations // c.num_mini_batches
    fresh = on_policy(c)
    # the frozen reference's copy of the parameters; with LoRA the zero adapters (adapter-sized), on device
    ref_bytes = device_bytes(state.params) if c.beta > 0 and not _ref_offloaded(config) else 0
    options = round_options(
        config, mesh, state_sharding=shardings, num_mini_batches=c.num_mini_batches, model_cfg=model_cfg
    )
    extra = dict(advantages=False)
    if not fresh:
        extra["old_logps"] = True
    if c.beta > 0:
        extra["ref_logps"] = True
    batch = abstract_batch(mesh, _rollout_spec(n, tp, tc, **extra))
    rows = abstract_batch(mesh, _rollout_spec(t.batch_size * c.num_generations, tp, tc))
    not_params = device_bytes(state) - device_bytes(state.params)
    programs = [
        _generate_program(
            config,
            graphdef,
            state,
            mesh,
            resident=not_params + ref_bytes,
            gather_weights=options.gather_sampler_weights,
        ),
        Program(
            "grpo/update", update_step(c, graphdef, tx, options), (state, batch), resident_bytes=ref_bytes
        ),
    ]
    forward = make_completion_forward(
        graphdef, temperature=c.temperature, logits_chunk_size=t.logits_chunk_size
    )
    if not fresh and c.old_logprobs == "recompute":
        args = (state.params, state.rest, rows)
        programs.append(Program("grpo/old_logps", forward, args, resident_bytes=not_params + ref_bytes))
    if c.beta > 0:
        programs.append(
            _reference_program(
                "grpo/reference_logps",
                forward,
                (state.params, state.rest),  # LoRA: zero adapters of the same shapes over the state's base
                rows,
                offload=_ref_offloaded(config),
                resident=device_bytes(state),  # the train state stays on the device meanwhile
            )
        )
    return programs


def ppo_programs(config: RunConfig, model_cfg, mesh: Mesh) -> list[Program]:
    """PPO: the sampler (one completion per prompt), the policy update (and the separate value model's),
    the old log-probs / values forwards, the frozen reference (``kl_coef > 0``) and the reward model's
    scores. The value and reward models have the policy's architecture unless their ``config.json`` is
    found (``ppo.value_model_path``, ``ppo.reward_model``)."""
    from jrft.aot.presets import model_config
    from jrft.train.logprobs import make_completion_forward
    from jrft.train.objectives import ppo
    from jrft.train.ppo_round import PPOState, update_steps
    from jrft.train.runs.setup import optimizer_from_config, round_options, total_updates

    def architecture(path):
        try:
            return model_config(path) if path else model_cfg
        except ValueError:
            return model_cfg

    c, t = config.ppo, config.train
    head = c.value_model == "head"
    tx, _ = optimizer_from_config(config, total_steps=total_updates(config))
    graphdef, policy, policy_sharding = abstract_train_state(config, model_cfg, tx, mesh, scalar_head=head)
    value_graphdef = value = value_sharding = None
    if not head:
        value_cfg = architecture(c.value_model_path or c.reward_model)
        value_graphdef, value, value_sharding = abstract_train_state(
            config, value_cfg, tx, mesh, scalar_head=True, trained=False
        )
    state = PPOState(policy, value)
    options = round_options(
        config,
        mesh,
        state_sharding=PPOState(policy_sharding, value_sharding),
        num_mini_batches=c.num_mini_batches,
        model_cfg=model_cfg,
    )
    update_policy, update_value = update_steps(c, graphdef, value_graphdef, (tx, tx), options)
    tp, tc = bucket_length(config.data.max_prompt_length), c.max_new_tokens
    per_token = dict.fromkeys(("old_logps", "old_values", "advantages", "returns"), True)
    mini = abstract_batch(mesh, _rollout_spec(t.batch_size // c.num_mini_batches, tp, tc, **per_token))
    rows = abstract_batch(mesh, _rollout_spec(t.batch_size, tp, tc))
    reference = c.kl_coef > 0
    ref_bytes = device_bytes(policy.params) if reference and not _ref_offloaded(config) else 0
    reward_model = None
    if c.reward_model is not None:
        rm_graphdef, rm, _ = abstract_train_state(
            config, architecture(c.reward_model), tx, mesh, scalar_head=True, trained=False
        )
        reward_model = (rm_graphdef, rm.params, rm.rest)
    held = device_bytes(state) + ref_bytes + (device_bytes(reward_model[1:]) if reward_model else 0)

    def program(name, fn, args, long_lived):
        return Program(name, fn, args, resident_bytes=held - device_bytes(long_lived))

    forward = make_completion_forward(
        graphdef, temperature=c.temperature, values=head, logits_chunk_size=t.logits_chunk_size
    )
    sampler_resident = held - device_bytes((policy.params, policy.rest))
    sampler = _generate_program(
        config,
        graphdef,
        policy,
        mesh,
        resident=sampler_resident,
        gather_weights=options.gather_sampler_weights,
    )
    programs = [
        sampler,
        program("ppo/policy_update", update_policy, (policy, mini), policy),
        program(
            "ppo/policy_forward", forward, (policy.params, policy.rest, rows), (policy.params, policy.rest)
        ),
    ]
    if not head:
        value_forward = make_completion_forward(value_graphdef, temperature=1.0, logps=False, values=True)
        value_args = (value.params, value.rest)
        programs.append(program("ppo/value_update", update_value, (value, mini), value))
        programs.append(program("ppo/value_forward", value_forward, (*value_args, rows), value_args))
    if reference:
        programs.append(
            _reference_program(
                "ppo/reference",
                forward,
                (policy.params, policy.rest),
                rows,
                offload=_ref_offloaded(config),
                resident=held - ref_bytes,
            )
        )
    if reward_model is not None:
        score = ppo.make_score_fn(reward_model[0])
        programs.append(program("ppo/reward_score", score, (*reward_model[1:], rows), reward_model[1:]))
    return programs


PROGRAM_BUILDERS = {
    "sft": offline_programs,
    "reward": offline_programs,
    "dpo": offline_programs,
    "grpo": grpo_programs,
    "ppo": ppo_programs,
}


def run_programs(config: RunConfig, model_cfg, mesh: Mesh) -> list[Program]:
    """Every program a run of ``config`` compiles, abstract, for ``mesh``."""
    if config.objective not in PROGRAM_BUILDERS:
        built = ", ".join(sorted(PROGRAM_BUILDERS))
        raise NotImplementedError(f"jrft compile: {config.objective} is not built yet (built: {built})")
    return PROGRAM_BUILDERS[config.objective](config, model_cfg, mesh)
