"""On-policy preference pairs for the RLHF demo's reward model: the policy's own mistakes as rejected answers.

A reward model trained only on hand-made corruptions (a changed digit, a dropped carry, a broken format: see
``jrft.data.synthetic.REJECTION_KINDS``) learns to spot those corruptions, and PPO then finds completions
that look nothing like them but are still wrong: it games the reward model. Collecting comparisons of the
policy's own samples, as RLHF does with human raters (Ouyang et al. 2022), trains the reward model where PPO
will search. Here the "rater" is the task's checker: for each preference prompt the SFT policy draws a few
completions; the first wrong or malformed one replaces the synthetic rejected answer (the chosen answer stays
the correct trace). Prompts where every draw was right keep their synthetic rejection.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from jrft.demo.evaluate import EXACT_MATCH, STRICT_FORMAT, sampled_completions

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def answer_of(completion: str) -> str:
    """The text inside the ``<answer>`` tag of a correct trace."""
    match = _ANSWER.search(completion)
    if match is None:
        raise ValueError(f"no <answer> tag in the chosen completion {completion!r}")
    return match.group(1).strip()


def on_policy_pairs(
    model,
    tokenizer,
    rows: Sequence[Mapping[str, str]],
    *,
    num_samples: int,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 1.0,
    seed: int = 0,
) -> tuple[list[dict], dict[str, float]]:
    """``rows`` (``prompt, chosen, rejected[, rejected_kind]``) with each rejected answer replaced by the
    policy's first wrong or malformed non-empty draw (``rejected_kind: "policy"``) where it made one.

    Returns the new rows and stats: the policy's sample accuracy and the fraction of rows replaced.
    """
    prompts = [r["prompt"] for r in rows]
    draws = sampled_completions(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        num_samples=num_samples,
        temperature=temperature,
        seed=seed,
    )
    flat = [c for group in draws for c in group]
    answers = [answer_of(r["chosen"]) for r in rows for _ in range(num_samples)]
    good = (np.asarray(EXACT_MATCH(completions=flat, answer=answers)) > 0) & (
        np.asarray(STRICT_FORMAT(completions=flat)) > 0
    )
    good = good.reshape(len(rows), num_samples)
    out = []
    for row, group, ok in zip(rows, draws, good, strict=True):
        wrong = [c for c, k in zip(group, ok, strict=True) if not k and c.strip()]  # empty: not a completion
        row = dict(row)
        if wrong:
            row.update(rejected=wrong[0], rejected_kind="policy")
        out.append(row)
    replaced = float(np.mean([r.get("rejected_kind") == "policy" for r in out]))
    return out, {"sample_accuracy": float(good.mean()), "policy_rejected_fraction": replaced}
