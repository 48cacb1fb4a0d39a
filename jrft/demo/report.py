"""The demo's report: a PNG of the curves, a before/after table, sample completions (terminal and markdown).

Curves come from the stages' ``metrics.jsonl`` files (the loop's log): SFT loss, RL reward and KL, held-out
accuracy of the evaluations during RL; DPO/reward-model runs plot their loss and preference accuracy.
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
    ("DPO loss", "dpo", ("loss",)),
    ("DPO reward accuracy (train)", "dpo", ("rewards/accuracies",)),
    ("reward model loss", "reward", ("loss",)),
    ("PPO reward-model score", "ppo", ("rm_score/mean", "score/mean")),
    ("PPO KL to the SFT model", "ppo", ("kl_mean",)),
)

METRIC_LABELS = {
    "accuracy": "held-out exact match",
    "format_rate": "format rate",
    "preference_accuracy": "held-out preference acc. (log p)",
    "implicit_reward_accuracy": "held-out DPO implicit-reward acc.",
    "rm_preference_accuracy": "reward model held-out pref. acc.",
    "rm_score": "reward-model score (greedy)",
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


def plot(result: DemoResult, path: str) -> str:
    """Writes the PNG of every available curve (and held-out accuracy during RL); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for title, stage, keys in PANELS:
        curve = read_curve(result.metrics_files.get(stage, ""), keys)
        if curve is not None:
            panels.append((title, *curve))
    if result.sft_evals:
        steps, values = [e[0] for e in result.sft_evals], [100 * e[1] for e in result.sft_evals]
        panels.append(("held-out accuracy during SFT", "accuracy", steps, values))
    if result.evals:
        steps = [e[0] for e in result.evals]
        panels.append(
            ("held-out accuracy during GRPO", "accuracy", steps, [100 * e[1] for e in result.evals])
        )
    cols = min(len(panels), 2) or 1
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, key, steps, values) in zip(axes.flat, panels, strict=False):
        if key == "kl_mean" and not any(values) and title.startswith("GRPO"):
            # beta = 0: the trainer never computes reference log-probs, so there is no KL to show
            ax.text(0.5, 0.5, "not computed: grpo.beta = 0\n(no reference model)", ha="center", va="center")
            ax.set_title(title)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("%" if key == "accuracy" else key)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"jrft demo --objective {result.objective}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
    lines.append("")
    lines.append("time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items()))
    return "\n".join(lines)


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
        f.write(f"# jrft demo --objective {result.objective}\n\n![curves](report.png)\n\n```\n{text}\n```\n")
    return text, png
