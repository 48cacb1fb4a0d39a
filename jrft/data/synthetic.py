"""A synthetic reasoning task for ``jrft demo`` and tests: multi-digit addition with a column-sum trace.

Prompt ``123+456=``, completion ``<think>3+6+0=09,2+5+0=07,1+4+0=05</think><answer>579</answer>``: one
``x+y+c=s`` step per column from the units digit, ``c`` the carry in and ``s`` the two-digit column sum
(its first digit is the next carry). The answer is ``a + b``. (The task and its sizes follow a probe we
ran in plain PyTorch on a 0.8M-parameter model: SFT on a few hundred problems plateaus, GRPO with a
correctness check keeps improving.)

* Splits are disjoint by construction: a problem is held out iff ``crc32("a+b") % 1000 <
  1000 * heldout_fraction``, whatever the seed, so no seed can leak a held-out problem into training.
* Writers: SFT rows ``{prompt, completion}``, prompt-only rows ``{prompt, answer}`` (for GRPO/PPO; the
  ``answer`` column reaches the correctness reward), preference rows ``{prompt, chosen, rejected,
  rejected_kind}`` where chosen is the correct well-formatted trace and rejected is one of
  :data:`REJECTION_KINDS` (wrong answers and broken formats).
* :func:`arithmetic_tokenizer`: a character-level tokenizer over :data:`ALPHABET` with each tag one token,
  built by :func:`jrft.data.local_tokenizer.train_tokenizer` (bos/eos/pad/unk + chat role markers).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

ALPHABET = "0123456789+-=,"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_ANSWER_RE = re.compile(r"<answer>(-?\d+)</answer>")
_FORMAT_RE = re.compile(r"^<think>[^<>]*</think><answer>-?\d+</answer>$")


def addition_steps(a: int, b: int, num_digits: int) -> list[tuple[int, int, int, int]]:
    """Column steps ``(x, y, carry_in, column_sum)`` from the units digit up."""
    steps, carry = [], 0
    for k in range(num_digits):
        x, y = (a // 10**k) % 10, (b // 10**k) % 10
        s = x + y + carry
        steps.append((x, y, carry, s))
        carry = s // 10
    return steps


def format_trace(steps: Iterable[tuple[int, int, int, int]], answer: int | str) -> str:
    think = ",".join(f"{x}+{y}+{c}={s:02d}" for x, y, c, s in steps)
    return f"<think>{think}</think><answer>{answer}</answer>"


def addition_trace(a: int, b: int, num_digits: int = 3) -> str:
    """The completion for ``a+b=``: column sums with carries, then the answer."""
    return format_trace(addition_steps(a, b, num_digits), a + b)


def extract_answer(completion: str) -> str | None:
    """The text inside the first ``<answer>...</answer>`` (digits), or None."""
    m = _ANSWER_RE.search(completion)
    return m.group(1) if m else None


def is_well_formatted(completion: str) -> bool:
    """Exactly ``<think>...</think><answer>digits</answer>`` and nothing else."""
    return _FORMAT_RE.match(completion.strip()) is not None


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    num_digits: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def completion(self) -> str:
        return addition_trace(self.a, self.b, self.num_digits)


@dataclass(frozen=True)
class AdditionTask:
    """``num_digits``-digit + ``num_digits``-digit addition (operands without leading zeros)."""

    num_digits: int = 3
    heldout_fraction: float = 0.1

    def __post_init__(self):
        if not 1 <= self.num_digits <= 9:
            raise ValueError(f"num_digits must be in [1, 9], got {self.num_digits}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

    def is_heldout(self, a: int, b: int) -> bool:
        return zlib.crc32(f"{a}+{b}".encode()) % 1000 < int(1000 * self.heldout_fraction)

    def sample(self, n: int, *, split: str = "train", seed: int = 0) -> list[Problem]:
        """``n`` distinct problems of ``split`` ("train" or "heldout"), a function of ``seed``."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        lo, hi = (10 ** (self.num_digits - 1) if self.num_digits > 1 else 0), 10**self.num_digits
        space = (hi - lo) ** 2
        expected = space * (self.heldout_fraction if split == "heldout" else 1 - self.heldout_fraction)
        if n > 0.5 * expected:
            raise ValueError(f"asked for {n} distinct {split} problems of ~{int(expected)}: use more digits")
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        want_heldout = split == "heldout"
        seen: set[tuple[int, int]] = set()
        out: list[Problem] = []
        while len(out) < n:
            a, b = (int(v) for v in rng.integers(lo, hi, size=2))
            if (a, b) in seen or self.is_heldout(a, b) != want_heldout:
                continue
            seen.add((a, b))
            out.append(Problem(a, b, self.num_digits))
        return out


# --- rejected completions for preference data (a registry of named corruptions) ---------------------------


def _dropped_carry(p: Problem, rng: np.random.Generator) -> str | None:
    """Forgets every carry: a consistent-looking trace with a wrong answer (None when no carry happens)."""
    steps = [(x, y, 0, x + y) for x, y, _, _ in addition_steps(p.a, p.b, p.num_digits)]
    wrong = sum((s % 10) * 10**k for k, (_, _, _, s) in enumerate(steps))
    return None if wrong == p.a + p.b else format_trace(steps, wrong)


def _wrong_digit(p: Problem, rng: np.random.Generator) -> str:
    """The correct trace, but one digit of the answer changed."""
    answer = p.a + p.b
    k = int(rng.integers(0, len(str(answer))))
    digit = (answer // 10**k) % 10
    new_digit = (digit + int(rng.integers(1, 10))) % 10
    if k == len(str(answer)) - 1 and new_digit == 0:  # keep the same number of digits
        new_digit = 1 if digit != 1 else 2
    wrong = answer + (new_digit - digit) * 10**k
    return format_trace(addition_steps(p.a, p.b, p.num_digits), wrong)


def _no_answer_tags(p: Problem, rng: np.random.Generator) -> str:
    think = p.completion.split("<answer>")[0]
    return f"{think}{p.answer}"


def _no_think(p: Problem, rng: np.random.Generator) -> str:
    return f"<answer>{p.answer}</answer>"


def _truncated(p: Problem, rng: np.random.Generator) -> str:
    think = p.completion.split("</think>")[0]
    cut = int(rng.integers(len("<think>") + 1, len(think)))
    return think[:cut]


def _miscopied_operand(p: Problem, rng: np.random.Generator) -> str:
    """One digit of an operand copied wrong into the trace; everything after it follows from the wrong digit
    (a policy's typical slip: the arithmetic is right, the input is not): the correct trace of the problem
    with that digit changed."""
    k, which = int(rng.integers(0, p.num_digits)), int(rng.integers(0, 2))
    operand = (p.a, p.b)[which]
    old = (operand // 10**k) % 10
    changed = operand + ((old + int(rng.integers(1, 10))) % 10 - old) * 10**k
    a, b = (changed, p.b) if which == 0 else (p.a, changed)
    return addition_trace(a, b, p.num_digits)


def _wrong_column_sum(p: Problem, rng: np.random.Generator) -> str:
    """One column's sum off by 1 or 2; later columns carry from the sums as written, and the answer is what
    the written sums spell (a consistent-looking trace)."""
    correct = addition_steps(p.a, p.b, p.num_digits)
    k = int(rng.integers(0, p.num_digits))
    s = correct[k][3]
    wrong = int(rng.choice([s + d for d in (-2, -1, 1, 2) if 0 <= s + d <= 19]))
    steps, carry, answer = [], 0, 0
    for j, (x, y, _, _) in enumerate(correct):
        s = wrong if j == k else x + y + carry
        steps.append((x, y, carry, s))
        answer += (s % 10) * 10**j
        carry = s // 10
    return format_trace(steps, answer + carry * 10**p.num_digits)


REJECTION_KINDS: dict[str, Callable[[Problem, np.random.Generator], str | None]] = {
    "dropped_carry": _dropped_carry,
    "wrong_digit": _wrong_digit,
    "no_answer_tags": _no_answer_tags,
    "no_think": _no_think,
    "truncated": _truncated,
    "miscopied_operand": _miscopied_operand,
    "wrong_column_sum": _wrong_column_sum,
}
# What preference_rows draws from by default; the two slips of a single step (a miscopied operand digit, a
# wrong column sum, each followed consistently to a wrong answer) are opt-in by name (``kinds=``).
DEFAULT_REJECTION_KINDS = ("dropped_carry", "wrong_digit", "no_answer_tags", "no_think", "truncated")


# --- rows and writers -----------------------------------------------------------------------------------


def sft_rows(problems: Iterable[Problem]) -> list[dict]:
    return [{"prompt": p.prompt, "completion": p.completion} for p in problems]


def prompt_rows(problems: Iterable[Problem]) -> list[dict]:
    return [{"prompt": p.prompt, "answer": p.answer} for p in problems]


def preference_rows(
    problems: Iterable[Problem], *, seed: int = 0, kinds: Iterable[str] | None = None
) -> list[dict]:
    """Chosen = the correct trace; rejected = a corruption drawn from ``kinds`` (default:
    ``DEFAULT_REJECTION_KINDS``)."""
    names = list(kinds) if kinds is not None else list(DEFAULT_REJECTION_KINDS)
    for name in names:
        if name not in REJECTION_KINDS:
            raise ValueError(f"unknown rejection kind {name!r}; expected one of {sorted(REJECTION_KINDS)}")
    rng = np.random.default_rng([seed, 2])
    rows = []
    for p in problems:
        for j in rng.permutation(len(names)):  # the first drawn kind that applies to this problem
            rejected = REJECTION_KINDS[names[j]](p, rng)
            if rejected is not None and rejected != p.completion:
                break
        else:
            raise ValueError(f"no rejection kind of {names} applies to {p.prompt}")
        rows.append(
            {"prompt": p.prompt, "chosen": p.completion, "rejected": rejected, "rejected_kind": names[j]}
        )
    return rows


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> str:
    """Writes rows as JSON lines (directories created); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_task_files(
    out_dir: str | os.PathLike,
    *,
    num_train: int = 300,
    num_heldout: int = 500,
    num_rl_prompts: int = 5000,
    seed: int = 0,
    task: AdditionTask | None = None,
) -> dict[str, str]:
    """The demo's files: SFT train / held-out rows, RL prompts (train split, disjoint from the SFT problems,
    answers as a column), held-out prompts, and preference train / held-out rows. Returns name -> path."""
    task = task or AdditionTask()
    train = task.sample(num_train + num_rl_prompts, split="train", seed=seed)
    labelled, fresh = train[:num_train], train[num_train:]  # RL prompts are problems SFT never saw
    heldout = task.sample(num_heldout, split="heldout", seed=seed)
    out = os.fspath(out_dir)
    files = {
        "sft_train": sft_rows(labelled),
        "sft_heldout": sft_rows(heldout),
        "prompts_train": prompt_rows(fresh),
        "prompts_heldout": prompt_rows(heldout),
        "pref_train": preference_rows(labelled, seed=seed),
        "pref_heldout": preference_rows(heldout, seed=seed + 1),
    }
    return {name: write_jsonl(rows, os.path.join(out, f"{name}.jsonl")) for name, rows in files.items()}


def arithmetic_tokenizer(**kwargs):
    """The task's character-level tokenizer: ALPHABET characters, each TAG one token, plus
    ``<pad> <bos> <eos> <unk>`` and the chat role markers (see ``train_tokenizer``)."""
    from jrft.data.local_tokenizer import train_tokenizer

    return train_tokenizer(kind="char", alphabet=ALPHABET, added_tokens=TAGS, **kwargs)
