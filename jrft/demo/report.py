"""The demo's report: a PNG of the curves, a before/after table, sample completions (terminal and markdown).

Curves come from the stages' ``metrics.jsonl`` files (the loop's log): SFT loss, RL reward and KL (left out
when it was not computed), and held-out exact match of SFT and the RL stage on one time axis (minutes since
the demo started); DPO/reward-model runs plot their loss and preference accuracy.
Matplotlib runs with the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from jrft.demo.stages import DemoResult

# (title, stage, metric keys tried in order): one panel each, drawn when the metric exists.
PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("SFT loss", "sft", ("loss",)),
    ("GRPO reward (mean)", "grpo", ("rewards/mean",)),
    ("GRPO KL to the SFT model", "grpo", ("kl_mean",)),
    ("GRPO trajectories calling a tool (train)", "grpo", ("agent/tool_call_rate",)),
    ("GRPO failed tool calls / calls (train)", "grpo", ("agent/tool_failure_rate",)),
    ("DPO loss", "dpo", ("loss",)),
    ("DPO reward accuracy (train)", "dpo", ("rewards/accuracies",)),
    ("reward model loss", "reward", ("loss",)),
    ("PPO reward-model score", "ppo", ("rm_score/mean", "score/mean")),
    ("PPO KL to the SFT model", "ppo", ("kl_mean",)),
)

# The stage whose held-out evaluations the timeline shows, by objective.
RL_STAGE = {"tools": "grpo", "rlhf": "ppo"}

METRIC_LABELS = {
    "accuracy": "held-out exact match",
    "format_rate": "format rate",
    "preference_accuracy": "held-out preference acc. (log p)",
    "implicit_reward_accuracy": "held-out DPO implicit-reward acc.",
    "rm_preference_accuracy": "reward model held-out pref. acc.",
    "rm_policy_pair_accuracy": "reward model acc., policy's mistakes",
    "rm_draw_pairwise_accuracy": "RM: correct SFT draw > wrong",
    "rm_best_of_n_accuracy": "RM's top-scored SFT draw correct",
    "rank_greedy_accuracy": "SFT greedy, same prompts",
    "rm_lm_accuracy": "RM's own LM, greedy exact match",
    "rm_score": "reward-model score (greedy)",
    "tool_call_rate": "held-out tool-call rate",
    "tool_failure_rate": "held-out failed calls / calls",
}


def read_curve(path: str, keys: Sequence[str]) -> tuple[str, list[int], list[float]] | None:
    """``(key, steps, values)`` of the first of ``keys`` logged in ``path`` (None if none is)."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            return key, [p[0] for p in points], [float(p[1]) for p in points]
    return None


def _eval_times(path: str) -> list[float]:
    """Seconds since the run started of each held-out evaluation logged in ``path`` (its ``time`` field)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [float(r.get("time", 0.0)) for r in records if "eval/accuracy" in r]


def _start_of(result: DemoResult, stage: str) -> float:
    """Seconds from the demo's start to the start of ``stage``: the stages timed before it, in order."""
    total = 0.0
    for name, seconds in result.seconds.items():
        if name == stage:
            return total
        total += seconds
    return total


def accuracy_timeline(result: DemoResult) -> list[tuple[str, list[float], list[float]]]:
    """Held-out exact match on one clock: ``(label, minutes since the demo started, accuracy %)`` for the
    evaluations during SFT and during the RL stage (whose step 0 is the SFT model), each placed at the
    time its run logged it plus the time of the stages before it."""
    lines = []
    if result.sft_evals:
        offset = _start_of(result, "sft")
        times = _eval_times(result.metrics_files.get("sft", ""))
        if len(times) != len(result.sft_evals):  # no times logged: spread over the stage
            times = [
                result.seconds.get("sft", 0.0) * (i + 1) / len(result.sft_evals)
                for i in range(len(result.sft_evals))
            ]
        lines.append(("SFT", [(offset + t) / 60 for t in times], [100 * e[1] for e in result.sft_evals]))
    if result.evals:
        rl = RL_STAGE.get(result.objective, result.objective)
        offset = _start_of(result, rl)
        during = _eval_times(result.metrics_files.get(rl, ""))
        times = [0.0, *during] if len(during) == len(result.evals) - 1 else None
        if times is None:  # no times logged: spread over the stage
            n = len(result.evals)
            times = [result.seconds.get(rl, 0.0) * i / max(n - 1, 1) for i in range(n)]
        lines.append((rl.upper(), [(offset + t) / 60 for t in times], [100 * e[1] for e in result.evals]))
    return lines


def _panels(result: DemoResult) -> list[tuple[str, str, list, list]]:
    """``(title, key, steps, values)`` of every curve with something to show: a metric logged as all zeros
    because it was not computed (the KL with beta = 0: no reference model) is left out."""
    panels = []
    for title, stage, keys in PANELS:
        curve = read_curve(result.metrics_files.get(stage, ""), keys)
        if curve is None or (curve[0] == "kl_mean" and not any(curve[2])):
            continue
        panels.append((title, *curve))
    if result.objective == "tools" and result.evals:  # (step, accuracy, tool-call rate), step 0 = SFT
        steps, rates = [e[0] for e in result.evals], [e[2] for e in result.evals]
        panels.append(("held-out trajectories calling a tool", "tool-call rate", steps, rates))
    return panels


def plot(result: DemoResult, path: str) -> str:
    """Writes the PNG of every available curve, and held-out exact match of SFT and the RL stage on one
    time axis; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(result)
    timeline = accuracy_timeline(result)
    n = len(panels) + bool(timeline)
    cols = min(n, 2) or 1
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, (title, key, steps, values) in zip(flat, panels, strict=False):
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if timeline:
        ax = flat[len(panels)]
        for label, minutes, values in timeline:
            ax.plot(minutes, values, marker="o", markersize=3, label=label)
        if len(timeline) > 1:
            ax.axvline(timeline[-1][1][0], color="gray", linestyle=":", linewidth=1)
        ax.set_title("held-out exact match (greedy)")
        ax.set_xlabel("minutes since the demo started")
        ax.set_ylabel("%")
        ax.legend()
        ax.grid(alpha=0.3)
    for ax in flat[n:]:
        ax.axis("off")
    fig.suptitle(heading(result))
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def heading(result: DemoResult) -> str:
    """``jrft demo --objective X`` plus the adapters of the stage after SFT when it ran with ``--lora``."""
    text = f"jrft demo --objective {result.objective}"
    if result.lora_rank:
        share = result.adapter_params / max(result.num_params, 1)
        adapters = f"{result.adapter_params:,} adapter parameters, {share:.0%} of the model"
        text += f" --lora (rank {result.lora_rank}: {adapters})"
    return text


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if key == "rm_score" else f"{100 * value:.1f}%"


def table(result: DemoResult) -> str:
    """The before/after table and the time per stage, as fixed-width text."""
    keys = [k for k in METRIC_LABELS if k in result.before or k in result.after]
    width = max(len(METRIC_LABELS[k]) for k in keys) if keys else 10
    lines = [f"{'':{width}}  {'before':>9}  {'after':>9}  {'change':>9}"]
    for k in keys:
        b, a = result.before.get(k), result.after.get(k)
        if b is not None and a is not None:
            change = f"{a - b:+.3f}" if k == "rm_score" else f"{100 * (a - b):+.1f} pt"
        else:
            change = ""
        lines.append(f"{METRIC_LABELS[k]:{width}}  {_fmt(k, b):>9}  {_fmt(k, a):>9}  {change:>9}")
    if "evals_averaged" in result.after:
        n = int(result.after["evals_averaged"])
        lines.append(
            f"(after = mean of the last {n} held-out evaluations; final one: "
            f"{_fmt('accuracy', result.after.get('final_accuracy'))} exact match)"
        )
    verdict = reward_hacking_note(result)
    if verdict:
        lines.append(verdict)
    lines.append("")
    lines.append("time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items()))
    return "\n".join(lines)


def reward_hacking_note(result: DemoResult) -> str:
    """For the RLHF demo: whether PPO raised the reward-model score while held-out exact match fell (the
    policy exploiting the reward model), with the last logged KL to the SFT model; empty otherwise."""
    b, a = result.before, result.after
    if result.objective != "rlhf" or not {"rm_score", "accuracy"} <= set(b) & set(a):
        return ""
    kl = read_curve(result.metrics_files.get("ppo", ""), ("kl_mean",))
    kl_text = f"; KL to the SFT model at the end {kl[2][-1]:.3f} nats/token (KL panel)" if kl else ""
    if a["rm_score"] > b["rm_score"] and a["accuracy"] < b["accuracy"]:
        return (
            f"PPO raised the reward-model score ({b['rm_score']:.3f} -> {a['rm_score']:.3f}) while held-out "
            f"exact match FELL ({100 * b['accuracy']:.1f}% -> {100 * a['accuracy']:.1f}%): the policy found "
            f"answers the reward model over-rates{kl_text}"
        )
    return f"PPO: reward-model score {b['rm_score']:.3f} -> {a['rm_score']:.3f}, exact match " + (
        f"{100 * b['accuracy']:.1f}% -> {100 * a['accuracy']:.1f}%{kl_text}"
    )


def samples(result: DemoResult) -> str:
    """Greedy completions of the same held-out prompts before and after."""
    lines = []
    after = dict((p, c) for p, c, _ in result.samples_after)
    for prompt, completion, answer in result.samples_before:
        lines.append(f"{prompt}  (answer {answer})")
        lines.append(f"  before: {completion}")
        if prompt in after:
            lines.append(f"  after:  {after[prompt]}")
    return "\n".join(lines)


def write_report(result: DemoResult) -> tuple[str, str]:
    """Writes ``report.png`` and ``report.md`` into the output directory and returns the terminal text and
    the PNG path."""
    png = plot(result, os.path.join(result.output_dir, "report.png"))
    parts = [
        *([heading(result)] if result.lora_rank else []),
        table(result),
        "",
        "sample completions (greedy, held out):",
        samples(result),
        "",
        f"plot:    {png}",
        "metrics: " + ", ".join(result.metrics_files.values()),
    ]
    if result.export_dir:
        parts.append(f"model:   {result.export_dir} (transformers format)")
        parts.extend(f"         {v}" for v in result.load_check.values())
    text = "\n".join(parts)
    with open(os.path.join(result.output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(f"# {heading(result)}\n\n![curves](report.png)\n\n```\n{text}\n```\n")
    return text, png
