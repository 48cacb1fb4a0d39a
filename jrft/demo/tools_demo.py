"""``jrft demo --objective tools``: SFT on a mix of tool-using and direct answers, then multi-turn GRPO.

The task (:mod:`jrft.demo.tools_task`): ``a*b=`` for three-digit ``a``, ``b``, which the tiny model cannot
compute, with a ``calc`` tool it can call (``<tool_call>{"name": "calc", ...}</tool_call>``, the result
comes back as a ``tool`` message). SFT teaches the format from conversations of which only a share call the
tool; GRPO (``grpo.tools``, ``jrft.agentic``) samples whole trajectories, runs the calls on the host, and
rewards a correct final ``<answer>`` only. Held-out evaluation runs the same multi-turn rollout, greedy, with
the tool: exact match, the share of trajectories that called the tool and the share of calls that failed.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from jrft.config import RunConfig
from jrft.demo import stages
from jrft.demo.evaluate import EXACT_MATCH
from jrft.demo.settings import DemoConfig
from jrft.demo.stages import DemoResult, _evals_from, _Timer, check_export, read_jsonl
from jrft.demo.tools_task import CALC_SPEC, MultiplicationTask, tools_tokenizer, write_tool_task_files


@dataclasses.dataclass(frozen=True)
class ToolEval:
    """Greedy multi-turn results on held-out prompts: ``accuracy`` (exact match of the last ``<answer>``),
    ``tool_call_rate`` (trajectories with at least one call), ``tool_failure_rate`` (failed calls / calls),
    and the first few ``samples`` as ``(prompt, conversation text, answer)``."""

    accuracy: float
    tool_call_rate: float
    tool_failure_rate: float
    num: int
    seconds: float
    samples: tuple[tuple[str, str, str], ...] = ()

    def as_metrics(self) -> dict[str, float]:
        return {
            "accuracy": self.accuracy,
            "tool_call_rate": self.tool_call_rate,
            "tool_failure_rate": self.tool_failure_rate,
        }


def conversation_text(messages: Sequence[Mapping]) -> str:
    """A trajectory on one line: model turns as they are, tool results as ``[tool: ...]``."""
    return " ".join(
        f"[{m['role']}: {m['content']}]" if m["role"] != "assistant" else str(m["content"]) for m in messages
    )


def evaluate_with_tools(
    model,
    tokenizer,
    rows: Sequence[Mapping[str, str]],
    toolbox,
    *,
    max_turns: int,
    max_new_tokens: int,
    batch_size: int,
    num_samples: int = 4,
) -> ToolEval:
    """Greedy multi-turn rollouts of ``rows`` (``{prompt, answer}``) with ``toolbox``'s tools,
    ``batch_size`` prompts at a time (the last chunk padded with its first row: one compiled shape)."""
    from jrft.agentic.environment import ToolEnvironment
    from jrft.agentic.parsing import parse_hermes
    from jrft.agentic.rollout import AgentSettings, sample_multiturn
    from jrft.train.rollout import SamplingSettings

    t0 = time.perf_counter()
    settings = SamplingSettings(
        num_generations=1,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        top_k=None,
        top_p=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    agent = AgentSettings(
        make_env=lambda: ToolEnvironment(toolbox, parse_hermes),
        max_turns=max_turns,
        tool_schemas=toolbox.schemas,
    )
    conversations, turns = [], []
    size = min(batch_size, len(rows))
    for lo in range(0, len(rows), size):
        chunk = list(rows[lo : lo + size])
        n = len(chunk)
        chunk += [chunk[0]] * (size - n)
        batch = {"prompts": [r["prompt"] for r in chunk], "columns": {"answer": [r["answer"] for r in chunk]}}
        rollout = sample_multiturn(model, batch, tokenizer, settings, agent, rng=jax.random.key(lo))
        conversations += rollout.completions[:n]
        turns += rollout.turns[:n]
    correct = EXACT_MATCH(completions=conversations, answer=[r["answer"] for r in rows])
    calls = [[c for t in log for c in t.get("tool_calls", ())] for log in turns]
    failed = sum(t.get("failed_calls", 0) for log in turns for t in log)
    samples = tuple(
        (r["prompt"], conversation_text(c), r["answer"])
        for r, c in zip(rows[:num_samples], conversations, strict=False)
    )
    return ToolEval(
        accuracy=float(np.mean(correct)),
        tool_call_rate=float(np.mean([bool(c) for c in calls])),
        tool_failure_rate=failed / max(sum(len(c) for c in calls), 1),
        num=len(rows),
        seconds=time.perf_counter() - t0,
        samples=samples,
    )


def build(cfg: DemoConfig, out: str) -> dict[str, str]:
    """The tokenizer and a tiny Llama from scratch (``out/base``), and the task files (``out/data``)."""
    t = cfg.tools
    files = write_tool_task_files(
        os.path.join(out, "data"),
        num_sft=t.num_sft,
        num_rl_prompts=t.num_rl_prompts,
        num_heldout=t.num_heldout,
        tool_fraction=t.tool_fraction,
        seed=cfg.seed,
        task=MultiplicationTask(digits_a=t.digits_a, digits_b=t.digits_b),
    )
    return {"base": stages.save_new_model(cfg, tools_tokenizer(), out), **files}


def sft_config(cfg: DemoConfig, out: str, paths: dict[str, str]) -> RunConfig:
    """The demo's SFT stage on the tool task's conversations."""
    t = cfg.tools
    return stages.sft_config(
        cfg,
        out,
        paths,
        [
            "data.format=messages",
            f"data.max_length={t.max_new_tokens + 32}",
            f"train.steps={t.sft_steps}",
            f"train.eval_every={t.eval_every_sft}",
        ],
    )


def grpo_config(cfg: DemoConfig, out: str, paths: dict[str, str], model_path: str) -> RunConfig:
    """The demo's GRPO stage with the calc tool, multi-turn, rewarded for a correct final answer only."""
    t = cfg.tools
    accuracy = "{name: accuracy, weight: 1.0, kwargs: {extract: [answer_tag], symbolic: false}}"
    return stages.grpo_config(
        cfg,
        out,
        paths,
        model_path,
        [
            f"data.max_length={t.max_new_tokens + 32}",
            f"optim.warmup_steps={t.warmup_steps}",
            f"train.steps={t.grpo_steps}",
            f"train.batch_size={t.prompts_per_step}",
            f"train.eval_every={t.eval_every}",
            f"grpo.max_new_tokens={t.max_new_tokens}",
            f"grpo.dynamic_sampling={str(t.dynamic_sampling).lower()}",
            f"grpo.reward_functions=[{accuracy}]",
            f"grpo.tools=[{{spec: '{CALC_SPEC}'}}]",
            f"grpo.max_turns={t.max_turns}",
            f"grpo.log_completions_every={max(t.eval_every, 1)}",
        ],
    )


def run_tools_demo(cfg: DemoConfig, result: DemoResult, paths, tokenizer, log, progress) -> None:
    from jrft.agentic.tools import ToolBox
    from jrft.models import from_pretrained
    from jrft.train.runs.grpo import run_grpo
    from jrft.train.runs.offline import run_offline
    from jrft.train.runs.setup import export_dir

    t = cfg.tools
    heldout = read_jsonl(paths["prompts_heldout"])
    toolbox = ToolBox([CALC_SPEC], timeout=10.0)
    evals: list[ToolEval] = []

    def tool_eval(model) -> ToolEval:
        ev = evaluate_with_tools(
            model,
            tokenizer,
            heldout,
            toolbox,
            max_turns=t.max_turns,
            max_new_tokens=t.max_new_tokens,
            batch_size=cfg.eval.batch_size,
            num_samples=cfg.eval.num_samples,
        )
        evals.append(ev)
        return ev

    def model_eval_fn(model):
        return tool_eval(model).as_metrics()

    try:
        with _Timer(result, "sft", log):
            config = sft_config(cfg, result.output_dir, paths)
            run_offline(config, progress=progress, model_eval_fn=model_eval_fn if t.eval_every_sft else None)
            result.metrics_files["sft"] = os.path.join(config.output_dir, "metrics.jsonl")
        result.sft_evals = _evals_from(result.metrics_files["sft"])
        sft_model = export_dir(config)
        with _Timer(result, "eval before", log):
            before = tool_eval(from_pretrained(sft_model))
        result.before.update(before.as_metrics())
        result.samples_before = before.samples
        result.evals.append((0, before.accuracy, before.tool_call_rate))
        log(
            f"   SFT model: exact match {before.accuracy:.1%}, tool calls in {before.tool_call_rate:.1%} of "
            f"trajectories, {before.tool_failure_rate:.1%} of calls failed (n={before.num})"
        )
        evals.clear()
        with _Timer(result, "grpo", log):
            config = grpo_config(cfg, result.output_dir, paths, sft_model)
            run_grpo(config, progress=progress, model_eval_fn=model_eval_fn)
            result.metrics_files["grpo"] = os.path.join(config.output_dir, "metrics.jsonl")
        result.evals.extend(
            (r["step"], r["eval/accuracy"], r["eval/tool_call_rate"])
            for r in read_jsonl(result.metrics_files["grpo"])
            if "eval/accuracy" in r
        )
        tail = evals[-cfg.grpo.eval_last :]
        result.after.update(
            accuracy=float(np.mean([e.accuracy for e in tail])),
            tool_call_rate=float(np.mean([e.tool_call_rate for e in tail])),
            tool_failure_rate=float(np.mean([e.tool_failure_rate for e in tail])),
            final_accuracy=evals[-1].accuracy,
            evals_averaged=float(len(tail)),
        )
        result.samples_after = evals[-1].samples
        result.export_dir = export_dir(config)
    finally:
        toolbox.close()
    with _Timer(result, "export check", log):
        result.load_check = check_export(result.export_dir, tokenizer, [r["prompt"] for r in heldout[:4]])
