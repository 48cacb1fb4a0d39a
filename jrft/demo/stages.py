"""The demo's stages: build -> SFT -> evaluate -> GRPO (or DPO, or reward model + PPO) -> evaluate -> export.

Each training stage is an ordinary jrft run: a :class:`jrft.config.RunConfig` derived from the demo settings
with ``load_config(None, overrides)`` and trained by ``run_offline`` / ``run_grpo`` / ``run_ppo``, writing
its ``metrics.jsonl``, checkpoints and transformers-format export under ``<output_dir>/<stage>/``. The
stage directories are removed first, so a rerun starts over instead of resuming a finished run.

The story (measured first in a plain PyTorch probe): SFT on a few hundred labelled problems teaches the
``<think>…</think><answer>…</answer>`` format but plateaus around 30% exact match; GRPO on fresh,
unlabelled prompts with a programmable correctness + format reward (DeepSeekMath, arXiv 2402.03300) then
raises accuracy further, because the checker needs no labelled trace.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence

import numpy as np

from jrft.config import RunConfig, load_config
from jrft.demo.evaluate import TaskEval, evaluate_task, preference_accuracy, reward_scores
from jrft.demo.settings import DemoConfig


@dataclasses.dataclass
class DemoResult:
    """What the report shows: stage timings, before/after numbers, curves' sources and sample completions.

    Attributes:
      objective: grpo | dpo | rlhf.
      seconds: stage name -> wall seconds, in order.
      before, after: metric name -> value (accuracy, format_rate, preference_accuracy, rm_score, ...).
      metrics_files: stage name -> its metrics.jsonl.
      samples_before, samples_after: ``(prompt, completion, answer)`` greedy samples.
      evals: ``(step, accuracy, format_rate)`` held-out evaluations during RL (step 0 = the SFT model);
        ``--objective tools`` has the tool-call rate in place of the format rate.
      sft_evals: the same during SFT (every ``sft.eval_every`` steps).
      export_dir: the final model in transformers format; load_check: what loading it showed.
      num_params: the model's parameters; lora_rank, adapter_params: the adapters of the stage after SFT
        (0 and 0 without ``--lora``).
    """

    objective: str
    output_dir: str
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    before: dict[str, float] = dataclasses.field(default_factory=dict)
    after: dict[str, float] = dataclasses.field(default_factory=dict)
    metrics_files: dict[str, str] = dataclasses.field(default_factory=dict)
    samples_before: tuple = ()
    samples_after: tuple = ()
    evals: list[tuple[int, float, float]] = dataclasses.field(default_factory=list)
    sft_evals: list[tuple[int, float, float]] = dataclasses.field(default_factory=list)
    export_dir: str = ""
    load_check: dict[str, str] = dataclasses.field(default_factory=dict)
    num_params: int = 0
    lora_rank: int = 0
    adapter_params: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class _Timer:
    def __init__(self, result: DemoResult, name: str, log: Callable[[str], None]):
        self.result, self.name, self.log = result, name, log

    def __enter__(self):
        self.log(f"== {self.name}")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        seconds = time.perf_counter() - self.t0
        self.result.seconds[self.name] = seconds
        if exc[0] is None:
            self.log(f"   {self.name}: {seconds:.1f}s")


# --- stage 1: tokenizer, model, task files ---------------------------------------------------------------


def new_model_config(cfg: DemoConfig, tokenizer):
    """The tiny Llama of ``cfg.model`` over ``tokenizer``'s vocabulary (its special ids in config.json)."""
    from jrft.models import ModelConfig

    m = cfg.model
    return ModelConfig(
        family="llama",
        vocab_size=len(tokenizer),
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        max_position_embeddings=256,
        tie_embeddings=m.tie_embeddings,
        hf_extra=tuple(
            (f"{name}_token_id", json.dumps(getattr(tokenizer, f"{name}_token_id")))
            for name in ("bos", "eos", "pad")
        ),
    )


def save_new_model(cfg: DemoConfig, tokenizer, out: str) -> str:
    """The tiny Llama of ``cfg.model`` initialised from ``cfg.seed``, saved with ``tokenizer`` in transformers
    format under ``out/base``; returns that directory."""
    from flax import nnx

    from jrft.models import Decoder, save_pretrained

    model = Decoder(new_model_config(cfg, tokenizer), rngs=nnx.Rngs(cfg.seed))
    return save_pretrained(model, os.path.join(out, "base"), tokenizer)


def build(cfg: DemoConfig, out: str) -> dict[str, str]:
    """The arithmetic tokenizer and a tiny Llama initialised from scratch (saved in transformers format under
    ``out/base``), and the task files under ``out/data``. Returns name -> path (``base`` and the files)."""
    from jrft.data.synthetic import (
        AdditionTask,
        arithmetic_tokenizer,
        preference_rows,
        write_jsonl,
        write_task_files,
    )

    t = cfg.task
    task = AdditionTask(num_digits=t.num_digits)
    files = write_task_files(
        os.path.join(out, "data"),
        num_train=t.num_sft,
        num_heldout=t.num_heldout,
        num_rl_prompts=t.num_rl_prompts,
        seed=cfg.seed,
        task=task,
    )
    paths = {"base": save_new_model(cfg, arithmetic_tokenizer(), out), **files}
    # Preference pairs on problems of the RL pool (the same draw write_task_files made), replacing the
    # default file, which has one pair per labelled SFT problem only.
    pool = task.sample(t.num_sft + t.num_rl_prompts, split="train", seed=cfg.seed)[t.num_sft :]
    write_jsonl(preference_rows(pool[: t.num_preference], seed=cfg.seed), paths["pref_train"])
    return paths


def num_params(path: str) -> int:
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(path, "model.safetensors"))
    return int(sum(v.size for v in tensors.values()))


def adapter_params(cfg: DemoConfig, base: str) -> int:
    """How many parameters the ``--lora`` adapters (rank ``lora.rank`` on all seven projections) train."""
    from jrft.models import ModelConfig
    from jrft.models.lora import LoRASpec, adapter_param_count

    spec = LoRASpec(rank=cfg.lora.rank, scale=cfg.lora.alpha / cfg.lora.rank)
    return adapter_param_count(ModelConfig.from_hf(base), spec)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- run configs of the training stages ------------------------------------------------------------------


def stage_config(cfg: DemoConfig, out: str, stage: str, model_path: str, overrides: list[str]) -> RunConfig:
    """The stage's RunConfig: common settings (seed, mesh, output dir, no intermediate checkpoints), then the
    stage's ``overrides``. The stage directory is emptied first (a rerun starts over)."""
    stage_dir = os.path.join(out, stage)
    shutil.rmtree(stage_dir, ignore_errors=True)
    return load_config(
        None,
        [
            f"seed={cfg.seed}",
            f"output_dir={stage_dir}",
            f"model.path={model_path}",
            f"mesh.data={cfg.mesh_data}",
            "train.save_every=0",
            "train.keep_last=1",
            *overrides,
        ],
    )


def lora_overrides(cfg: DemoConfig) -> list[str]:
    """The ``lora:`` section and learning rate of a stage trained with adapters (``jrft demo --lora``); empty
    when LoRA is off. Placed after the stage's own settings, so its ``optim.lr`` wins."""
    lo = cfg.lora
    if not lo.enabled:
        return []
    return [f"lora.rank={lo.rank}", f"lora.alpha={lo.alpha}", f"optim.lr={lo.lr}"]


def rewards_yaml(cfg: DemoConfig) -> str:
    """Correctness (exact match inside <answer>) + weighted strict format: the reward built-ins."""
    accuracy = "{name: accuracy, weight: 1.0, kwargs: {extract: [answer_tag], symbolic: false}}"
    return f"[{accuracy}, {{name: format, weight: {cfg.grpo.format_weight}}}]"


def sft_config(cfg: DemoConfig, out: str, paths: dict[str, str], extra: Sequence[str] = ()) -> RunConfig:
    """The SFT stage; ``extra`` overrides come last (another task's format, lengths and steps)."""
    s = cfg.sft
    return stage_config(
        cfg,
        out,
        "sft",
        paths["base"],
        [
            "objective=sft",
            f"data.train={paths['sft_train']}",
            "data.format=prompt_completion",
            "data.max_length=64",
            "data.buckets=16",  # rows are ~46 tokens: pad to 48, not 64
            f"optim.lr={s.lr}",
            f"optim.warmup_steps={s.warmup_steps}",
            "optim.schedule=cosine",
            f"train.steps={s.steps}",
            f"train.batch_size={s.batch_size}",
            f"train.log_every={s.log_every}",
            f"train.eval_every={s.eval_every}",
            *extra,
        ],
    )


def grpo_config(
    cfg: DemoConfig, out: str, paths: dict[str, str], model_path: str, extra: Sequence[str] = ()
) -> RunConfig:
    """The GRPO stage; ``extra`` overrides come before the LoRA ones (another task: sizes, rewards, tools)."""
    g = cfg.grpo
    return stage_config(
        cfg,
        out,
        "grpo",
        model_path,
        [
            "objective=grpo",
            f"data.train={paths['prompts_train']}",
            "data.format=prompt_only",
            "data.max_prompt_length=32",
            "data.max_length=96",
            "data.buckets=16",
            f"optim.lr={g.lr}",
            f"optim.warmup_steps={g.warmup_steps}",
            "optim.schedule=constant",
            f"train.steps={g.steps}",
            f"train.batch_size={g.prompts_per_step}",
            "train.log_every=1",
            f"train.eval_every={g.eval_every}",
            f"grpo.num_generations={g.num_generations}",
            f"grpo.max_new_tokens={g.max_new_tokens}",
            f"grpo.temperature={g.temperature}",
            f"grpo.beta={g.beta}",
            f"grpo.dynamic_sampling={str(g.dynamic_sampling).lower()}",
            f"grpo.max_sampling_rounds={g.max_sampling_rounds}",
            "grpo.epsilon_low=0.2",
            "grpo.epsilon_high=0.2",
            "grpo.loss_aggregation=dapo",
            f"grpo.reward_functions={rewards_yaml(cfg)}",
            f"grpo.log_completions_every={max(g.eval_every, 1)}",
            *extra,
            *lora_overrides(cfg),
        ],
    )


def preference_config(
    cfg: DemoConfig, out: str, paths: dict[str, str], model_path: str, objective: str
) -> RunConfig:
    s = cfg.dpo if objective == "dpo" else cfg.reward
    if objective == "dpo":
        extra = [f"dpo.beta={cfg.dpo.beta}", *lora_overrides(cfg)]
    else:
        extra = [
            f"reward.likelihood_coef={cfg.reward.likelihood_coef}",
            f"reward.sft_coef={cfg.reward.sft_coef}",
        ]
    return stage_config(
        cfg,
        out,
        objective,
        model_path,
        [
            f"objective={objective}",
            f"data.train={paths['pref_train']}",
            "data.format=preference",
            "data.max_length=96",
            "data.max_prompt_length=32",
            "data.max_completion_length=64",
            "data.buckets=64",
            f"optim.lr={s.lr}",
            f"optim.warmup_steps={s.warmup_steps}",
            "optim.schedule=cosine",
            f"train.steps={s.steps}",
            f"train.batch_size={s.batch_size}",
            "train.log_every=5",
            *extra,
        ],
    )


def ppo_config(
    cfg: DemoConfig,
    out: str,
    paths: dict[str, str],
    model_path: str,
    rm_path: str,
    extra: Sequence[str] = (),
) -> RunConfig:
    """The PPO stage against the reward model at ``rm_path``; ``extra`` overrides come before the LoRA ones
    (scripts/rlhf_probe.py: the checker as the reward, held-out evaluation)."""
    p = cfg.ppo
    return stage_config(
        cfg,
        out,
        "ppo",
        model_path,
        [
            "objective=ppo",
            f"data.train={paths['prompts_train']}",
            "data.format=prompt_only",
            "data.max_prompt_length=32",
            "data.max_length=96",
            "data.buckets=16",
            f"optim.lr={p.lr}",
            f"optim.warmup_steps={p.warmup_steps}",
            "optim.schedule=constant",
            f"train.steps={p.steps}",
            f"train.batch_size={p.prompts_per_step}",
            "train.log_every=1",
            f"ppo.num_mini_batches={p.mini_batches}",
            f"ppo.max_new_tokens={p.max_new_tokens}",
            f"ppo.kl_coef={p.kl_coef}",
            f"ppo.reward_model={rm_path}",
            *extra,
            *lora_overrides(cfg),
        ],
    )


# --- the stages ------------------------------------------------------------------------------------------


def _load(path: str):
    from jrft.models import from_pretrained

    return from_pretrained(path)


def _task_eval(cfg: DemoConfig, model, tokenizer, rows) -> TaskEval:
    e = cfg.eval
    return evaluate_task(
        model,
        tokenizer,
        rows,
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
        num_samples=e.num_samples,
    )


def _evals_from(metrics_file: str) -> list[tuple[int, float, float]]:
    return [
        (r["step"], r["eval/accuracy"], r["eval/format_rate"])
        for r in read_jsonl(metrics_file)
        if "eval/accuracy" in r
    ]


def _sft(cfg, out, paths, result, log, progress) -> str:
    """SFT from the scratch model; with ``sft.eval_every``, held-out exact match is logged during it."""
    from jrft.train.runs.offline import run_offline
    from jrft.train.runs.setup import export_dir

    heldout = read_jsonl(paths["prompts_heldout"])

    def model_eval_fn(model):
        return _task_eval(cfg, model, tokenizer_of(paths), heldout).as_metrics()

    with _Timer(result, "sft", log):
        config = sft_config(cfg, out, paths)
        run_offline(config, progress=progress, model_eval_fn=model_eval_fn if cfg.sft.eval_every else None)
        result.metrics_files["sft"] = os.path.join(config.output_dir, "metrics.jsonl")
    result.sft_evals = _evals_from(result.metrics_files["sft"])
    return export_dir(config)


def tokenizer_of(paths: dict[str, str]):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(paths["base"])


def check_export(path: str, tokenizer, prompts: list[str]) -> dict[str, str]:
    """Loads the exported model with ``jrft.models.from_pretrained`` and, when torch is importable, with
    ``transformers.AutoModelForCausalLM``, and compares their logits on ``prompts``."""
    from jrft.demo.evaluate import prompt_ids
    from jrft.sampling.text import left_pad

    model = _load(path)
    files = sorted(os.listdir(path))
    check = {"jrft": f"jrft.models.from_pretrained({path!r}) ok ({', '.join(files)})"}
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError:
        check["transformers"] = "skipped (torch is not installed)"
        return check
    from jrft.models.testing import hf_logits

    pad = tokenizer.pad_token_id
    tokens, mask = left_pad([prompt_ids(tokenizer, p) for p in prompts], pad)
    ours = np.asarray(model(tokens, mask))
    theirs = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(path).eval(), tokens, mask)
    diff = float(np.abs(theirs - ours)[mask.astype(bool)].max())
    check["transformers"] = f"AutoModelForCausalLM.from_pretrained ok, max |logit diff| vs jrft = {diff:.1e}"
    if diff > 1e-3:
        raise RuntimeError(f"jrft demo: transformers' logits differ from jrft's by {diff:.2e} ({path})")
    return check


def run_grpo_demo(cfg: DemoConfig, result: DemoResult, paths, tokenizer, log, progress) -> None:
    from jrft.train.runs.grpo import run_grpo
    from jrft.train.runs.setup import export_dir

    heldout = read_jsonl(paths["prompts_heldout"])
    sft_model = _sft(cfg, result.output_dir, paths, result, log, progress)
    with _Timer(result, "eval before", log):
        before = _task_eval(cfg, _load(sft_model), tokenizer, heldout)
    result.before.update(before.as_metrics())
    result.samples_before = before.samples
    result.evals.append((0, before.accuracy, before.format_rate))
    log(f"   SFT model: accuracy {before.accuracy:.1%}, format {before.format_rate:.1%} (n={before.num})")

    last: list[TaskEval] = []

    def model_eval_fn(model):
        ev = _task_eval(cfg, model, tokenizer, heldout)
        last.append(ev)
        return ev.as_metrics()

    with _Timer(result, "grpo", log):
        config = grpo_config(cfg, result.output_dir, paths, sft_model)
        run = run_grpo(config, progress=progress, model_eval_fn=model_eval_fn)
        result.metrics_files["grpo"] = os.path.join(config.output_dir, "metrics.jsonl")
    result.evals.extend(_evals_from(result.metrics_files["grpo"]))
    tail = last[-cfg.grpo.eval_last :]
    result.after.update(
        accuracy=float(np.mean([e.accuracy for e in tail])),
        format_rate=float(np.mean([e.format_rate for e in tail])),
        final_accuracy=last[-1].accuracy,
        final_format_rate=last[-1].format_rate,
        evals_averaged=float(len(tail)),
    )
    result.samples_after = last[-1].samples
    result.export_dir = export_dir(config)
    with _Timer(result, "export check", log):
        result.load_check = check_export(result.export_dir, tokenizer, [r["prompt"] for r in heldout[:4]])
    del run


def run_dpo_demo(cfg: DemoConfig, result: DemoResult, paths, tokenizer, log, progress) -> None:
    from jrft.demo.evaluate import pair_logps
    from jrft.train.runs.offline import run_offline
    from jrft.train.runs.setup import export_dir

    heldout = read_jsonl(paths["prompts_heldout"])
    pairs = read_jsonl(paths["pref_heldout"])
    sft_model = _sft(cfg, result.output_dir, paths, result, log, progress)
    with _Timer(result, "eval before", log):
        reference = _load(sft_model)
        ref_logps = pair_logps(reference, tokenizer, pairs)
        ev = _task_eval(cfg, reference, tokenizer, heldout)
        result.before.update(
            preference_accuracy=float(np.mean(ref_logps[0] > ref_logps[1])), **ev.as_metrics()
        )
        result.samples_before = ev.samples
    with _Timer(result, "dpo", log):
        config = preference_config(cfg, result.output_dir, paths, sft_model, "dpo")
        run_offline(config, progress=progress)
        result.metrics_files["dpo"] = os.path.join(config.output_dir, "metrics.jsonl")
    result.export_dir = export_dir(config)
    with _Timer(result, "eval after", log):
        policy = _load(result.export_dir)
        ev = _task_eval(cfg, policy, tokenizer, heldout)
        result.after.update(
            preference_accuracy=preference_accuracy(policy, tokenizer, pairs),
            implicit_reward_accuracy=preference_accuracy(policy, tokenizer, pairs, reference=ref_logps),
            **ev.as_metrics(),
        )
        result.samples_after = ev.samples
    with _Timer(result, "export check", log):
        result.load_check = check_export(result.export_dir, tokenizer, [r["prompt"] for r in heldout[:4]])


def _rm_accuracy(reward_model, tokenizer, pairs) -> float:
    prompts = [p["prompt"] for p in pairs]
    chosen = reward_scores(reward_model, tokenizer, prompts, [p["chosen"] for p in pairs])
    rejected = reward_scores(reward_model, tokenizer, prompts, [p["rejected"] for p in pairs])
    return float(np.mean(chosen > rejected))


def rank_sft_draws(cfg: DemoConfig, reward_model, policy, tokenizer, pairs: list[dict]) -> dict[str, float]:
    """The reward model on ``reward.rank_samples`` draws of the SFT policy per held-out preference prompt
    (``jrft.demo.preferences.rank_draws``), with the policy's greedy answers on the same prompts."""
    from jrft.demo.evaluate import EXACT_MATCH, sampled_completions
    from jrft.demo.preferences import answer_of, rank_draws

    rows = pairs[: cfg.reward.rank_prompts]
    prompts, answers = [r["prompt"] for r in rows], [answer_of(r["chosen"]) for r in rows]
    g = cfg.reward.rank_samples
    draws = sampled_completions(
        policy,
        tokenizer,
        prompts,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        num_samples=g,
        temperature=1.0,
        seed=cfg.seed + 5,
    )
    flat = [c for group in draws for c in group]
    correct = np.asarray(EXACT_MATCH(completions=flat, answer=[a for a in answers for _ in range(g)])) > 0
    scores = reward_scores(reward_model, tokenizer, [p for p in prompts for _ in range(g)], flat)
    answer_rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]
    greedy = _task_eval(cfg, policy, tokenizer, answer_rows)
    greedy_correct = np.asarray(EXACT_MATCH(completions=list(greedy.completions), answer=answers)) > 0
    return rank_draws(np.asarray(scores).reshape(-1, g), correct.reshape(-1, g), greedy_correct)


def _on_policy_pair_files(cfg: DemoConfig, paths, policy, tokenizer, result: DemoResult, log) -> dict:
    """Preference files whose rejected answers are the SFT policy's own mistakes where it made one (train:
    the reward model learns from them; held out: ``rm_policy_pair_accuracy``, the reward model's accuracy
    where PPO searches). Returns ``paths`` with ``pref_train`` and ``pref_policy_heldout`` set."""
    from jrft.data.synthetic import write_jsonl
    from jrft.demo.preferences import on_policy_pairs

    def pairs_from(key: str, salt: int):
        return on_policy_pairs(
            policy,
            tokenizer,
            read_jsonl(paths[key]),
            num_samples=cfg.reward.on_policy_samples,
            max_new_tokens=cfg.eval.max_new_tokens,
            batch_size=cfg.eval.batch_size,
            seed=cfg.seed + salt,
        )

    train, stats = pairs_from("pref_train", 0)
    heldout, _ = pairs_from("pref_heldout", 1)
    data = os.path.dirname(paths["pref_train"])
    paths = {
        **paths,
        "pref_train": write_jsonl(train, os.path.join(data, "pref_train_on_policy.jsonl")),
        "pref_policy_heldout": write_jsonl(
            [r for r in heldout if r.get("rejected_kind") == "policy"],
            os.path.join(data, "pref_heldout_policy.jsonl"),
        ),
    }
    result.before["sft_sample_accuracy"] = stats["sample_accuracy"]
    log(
        f"   SFT policy draws: {stats['sample_accuracy']:.1%} correct; "
        f"{stats['policy_rejected_fraction']:.1%} of the reward model's pairs now reject its own mistake"
    )
    return paths


def run_rlhf_demo(cfg: DemoConfig, result: DemoResult, paths, tokenizer, log, progress) -> None:

    from jrft.models import from_pretrained
    from jrft.train.runs.offline import run_offline
    from jrft.train.runs.setup import export_dir

    heldout = read_jsonl(paths["prompts_heldout"])
    pairs = read_jsonl(paths["pref_heldout"])
    sft_model = _sft(cfg, result.output_dir, paths, result, log, progress)
    if cfg.reward.on_policy_samples:
        with _Timer(result, "on-policy pairs", log):
            paths = _on_policy_pair_files(cfg, paths, _load(sft_model), tokenizer, result, log)
    with _Timer(result, "reward model", log):
        # before training: the SFT model with a freshly initialised scalar head
        untrained = from_pretrained(
            sft_model, scalar_head=True, seed=cfg.seed, reward_likelihood_coef=cfg.reward.likelihood_coef
        )
        result.before["rm_preference_accuracy"] = _rm_accuracy(untrained, tokenizer, pairs)
        del untrained
        config = preference_config(cfg, result.output_dir, paths, sft_model, "reward")
        run_offline(config, progress=progress)
        result.metrics_files["reward"] = os.path.join(config.output_dir, "metrics.jsonl")
        rm_path = export_dir(config)
        reward_model = from_pretrained(rm_path, scalar_head=True)
    prompts = [r["prompt"] for r in heldout]

    def score(model_path: str) -> tuple[float, TaskEval]:
        """The reward model's mean score of the policy's greedy held-out completions, and the task eval."""
        ev = _task_eval(cfg, _load(model_path), tokenizer, heldout)
        return float(np.mean(reward_scores(reward_model, tokenizer, prompts, list(ev.completions)))), ev

    with _Timer(result, "eval before", log):
        rm_acc = _rm_accuracy(reward_model, tokenizer, pairs)
        if paths.get("pref_policy_heldout"):
            policy_pairs = read_jsonl(paths["pref_policy_heldout"])
            if policy_pairs:
                result.after["rm_policy_pair_accuracy"] = _rm_accuracy(reward_model, tokenizer, policy_pairs)
                log(
                    f"   reward model on held-out pairs that reject the SFT policy's own mistakes: "
                    f"{result.after['rm_policy_pair_accuracy']:.1%} (n={len(policy_pairs)})"
                )
        if cfg.reward.rank_samples:
            ranking = rank_sft_draws(cfg, reward_model, _load(sft_model), tokenizer, pairs)
            result.after.update(
                rm_draw_pairwise_accuracy=ranking["within_prompt_pairwise_accuracy"],
                rm_best_of_n_accuracy=ranking["best_of_n_accuracy"],
                rank_greedy_accuracy=ranking["greedy_accuracy"],
            )
            verdict = "below" if ranking["best_of_n_accuracy"] < ranking["greedy_accuracy"] else "at or above"
            log(
                f"   reward model on {cfg.reward.rank_samples} SFT draws of each of "
                f"{min(len(pairs), cfg.reward.rank_prompts)} held-out prompts: a correct draw scores above "
                f"a wrong one {ranking['within_prompt_pairwise_accuracy']:.1%} of the time; its top-scored "
                f"draw is correct {ranking['best_of_n_accuracy']:.1%} vs greedy "
                f"{ranking['greedy_accuracy']:.1%} ({verdict} greedy)"
            )
        if cfg.reward.likelihood_coef or cfg.reward.sft_coef:
            # what the reward model's language model knows: its own greedy answers (PPO's target, in effect)
            result.after["rm_lm_accuracy"] = _task_eval(cfg, reward_model, tokenizer, heldout).accuracy
            log(
                f"   the reward model's own language model, decoding greedily: held-out exact match "
                f"{result.after['rm_lm_accuracy']:.1%} (it learned from the chosen answers of its pairs)"
            )
        rm_score, ev = score(sft_model)
        result.before.update(rm_score=rm_score, **ev.as_metrics())
        result.after["rm_preference_accuracy"] = rm_acc
        result.samples_before = ev.samples
    log(f"   reward model: held-out preference accuracy {rm_acc:.1%}; SFT policy's mean score {rm_score:.3f}")
    from jrft.train.runs.ppo import run_ppo

    with _Timer(result, "ppo", log):
        config = ppo_config(cfg, result.output_dir, paths, sft_model, rm_path)
        run_ppo(config, progress=progress)
        result.metrics_files["ppo"] = os.path.join(config.output_dir, "metrics.jsonl")
    result.export_dir = export_dir(config)
    with _Timer(result, "eval after", log):
        rm_score, ev = score(result.export_dir)
        result.after.update(rm_score=rm_score, **ev.as_metrics())
        result.samples_after = ev.samples
    with _Timer(result, "export check", log):
        result.load_check = check_export(result.export_dir, tokenizer, prompts[:4])
