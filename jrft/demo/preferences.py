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


def rank_draws(
    scores: np.ndarray, correct: np.ndarray, greedy_correct: np.ndarray | None = None
) -> dict[str, float]:
    """How well a reward model ranks a policy's own draws: ``scores`` and ``correct`` are ``[prompts, G]``
    (the reward model's score and the checker's verdict of each draw); ``greedy_correct`` ``[prompts]``.

    Returns ``within_prompt_pairwise_accuracy`` (a correct draw scored above a wrong draw of the same prompt,
    over all such pairs: the direction of PPO's update), ``best_of_n_accuracy`` (the top-scored draw is
    correct: what maximising the score buys), ``sample_accuracy`` and, given ``greedy_correct``,
    ``greedy_accuracy``. Best-of-n below greedy means the reward model's favourites are worse than the
    policy's own first choice: optimising it lowers exact match.
    """
    scores, correct = np.asarray(scores, np.float64), np.asarray(correct, bool)
    if scores.shape != correct.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and correct {correct.shape} must both be [prompts, G]")
    # pairs (i, a, b) with a correct and b wrong: sum over prompts of (#correct x #wrong)
    wins = (scores[:, :, None] > scores[:, None, :]) & correct[:, :, None] & ~correct[:, None, :]
    num_pairs = int((correct.sum(1) * (~correct).sum(1)).sum())
    stats = {
        "sample_accuracy": float(correct.mean()),
        "within_prompt_pairs": float(num_pairs),
        "within_prompt_pairwise_accuracy": float(wins.sum() / num_pairs) if num_pairs else float("nan"),
        "best_of_n_accuracy": float(correct[np.arange(len(scores)), scores.argmax(axis=1)].mean()),
    }
    if greedy_correct is not None:
        stats["greedy_accuracy"] = float(np.mean(greedy_correct))
    return stats
