"""Held-out evaluation for the demo: greedy exact match and format rate, preference accuracy, reward scores.

* :func:`evaluate_task` — greedy completions of held-out prompts (``jrft.sampling.generate``, temperature 0,
  batched), scored by the reward built-ins: ``accuracy`` (the ``<answer>`` tag only, exact numeric match) and
  ``format`` (strict ``<think>…</think><answer>…</answer>``). The reported numbers are the means.
* :func:`preference_accuracy` — the fraction of held-out pairs whose chosen completion the policy scores
  above the rejected one: by summed log-prob ``log pi(y_c|x) > log pi(y_r|x)``, or, with a reference, by
  DPO's implicit reward ``log pi/pi_ref(y_c|x) > log pi/pi_ref(y_r|x)`` (Rafailov et al. 2023, eq. 5).
* :func:`reward_scores` — a reward model's scalar on ``prompt + completion`` (its last real token).

Prompts are encoded as the training data encodes plain-text rows: ``[bos] + tokens(prompt)``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jrft.rewards import AccuracyReward, ThinkAnswerFormatReward
from jrft.sampling import generate
from jrft.sampling.text import decode_completions, left_pad
from jrft.train.logprobs import shifted_token_logps
from jrft.train.objectives.reward import sequence_rewards

# Exact match on the <answer> tag only (no last-number fallback, no symbolic equivalence).
EXACT_MATCH = AccuracyReward(extract=("answer_tag",), symbolic=False)
STRICT_FORMAT = ThinkAnswerFormatReward(mode="strict")


@dataclasses.dataclass(frozen=True)
class TaskEval:
    """Greedy held-out results: ``accuracy`` and ``format_rate`` in [0, 1] over ``num`` prompts, and the
    first few ``samples`` as ``(prompt, completion, answer)``."""

    accuracy: float
    format_rate: float
    num: int
    seconds: float
    samples: tuple[tuple[str, str, str], ...] = ()
    completions: tuple[str, ...] = ()

    def as_metrics(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "format_rate": self.format_rate}


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """``[bos] + tokens(prompt)``, as ``jrft.data`` encodes plain-text prompts."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def _chunks(n: int, size: int):
    for lo in range(0, n, size):
        yield lo, min(lo + size, n)


def sampled_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    num_samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[list[str]]:
    """``num_samples`` completions of each of ``prompts`` (``[N][G]``), ``batch_size`` prompts at a time (the
    last chunk padded by repeating its first prompt, so every call has the same shape and compiles once).
    ``temperature`` 0 is greedy; above 0 the draws are a function of ``seed`` and the chunk."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    out: list[list[str]] = []
    for i, (lo, hi) in enumerate(_chunks(len(ids), batch_size)):
        chunk = ids[lo:hi]
        chunk = chunk + [chunk[0]] * (min(batch_size, len(ids)) - len(chunk))
        tokens, mask = left_pad(chunk, pad)  # the sampler rounds the prompt length up to a bucket
        result = generate(
            model,
            tokens,
            mask,
            max_new_tokens=max_new_tokens,
            num_samples=num_samples,
            temperature=temperature,
            stop_token_ids=[tokenizer.eos_token_id],
            pad_token_id=pad,
            rng=jax.random.fold_in(jax.random.key(seed), i),
        )
        texts = decode_completions(tokenizer, result)
        out.extend(texts[j * num_samples : (j + 1) * num_samples] for j in range(hi - lo))
    return out


def greedy_completions(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy completions ``[N]`` of ``prompts`` (see :func:`sampled_completions`)."""
    texts = sampled_completions(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return [t[0] for t in texts]


def evaluate_task(
    model,
    tokenizer,
    rows: Sequence[Mapping[str, str]],
    *,
    max_new_tokens: int,
    batch_size: int,
    num_samples: int = 4,
) -> TaskEval:
    """Greedy exact-match accuracy and strict format rate on ``rows`` (``{prompt, answer}``)."""
    t0 = time.perf_counter()
    prompts = [r["prompt"] for r in rows]
    answers = [r["answer"] for r in rows]
    completions = greedy_completions(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    correct = EXACT_MATCH(completions=completions, answer=answers)
    formatted = STRICT_FORMAT(completions=completions)
    samples = tuple(zip(prompts[:num_samples], completions[:num_samples], answers[:num_samples], strict=True))
    return TaskEval(
        accuracy=float(np.mean(correct)),
        format_rate=float(np.mean(formatted)),
        num=len(rows),
        seconds=time.perf_counter() - t0,
        samples=samples,
        completions=tuple(completions),
    )


def _pad_right(seqs: Sequence[Sequence[int]], pad: int, multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    t = -(-max(len(s) for s in seqs) // multiple) * multiple
    tokens = np.full((len(seqs), t), pad, np.int32)
    mask = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)], mask[i, : len(s)] = s, 1
    return tokens, mask


def _encode(tokenizer, prompts: Sequence[str], completions: Sequence[str]):
    """``(tokens, attention_mask, completion_mask)`` ``[N, T]``: each row ``[bos] prompt completion [eos]``,
    right-padded, with the completion (and eos) marked."""
    eos = [tokenizer.eos_token_id]
    seqs, marks = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        p = prompt_ids(tokenizer, prompt)
        c = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + eos
        seqs.append(p + c)
        marks.append([0] * len(p) + [1] * len(c))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens, mask = _pad_right(seqs, pad)
    completion_mask, _ = _pad_right(marks, 0)
    return tokens, mask, completion_mask


def _encode_pairs(tokenizer, rows: Sequence[Mapping[str, str]]):
    """:func:`_encode` of ``[2N, T]`` rows: N chosen rows then N rejected rows."""
    prompts = [r["prompt"] for r in rows]
    return _encode(tokenizer, prompts + prompts, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])


@jax.jit
def _sequence_logps(model, tokens, mask, completion):
    logps = shifted_token_logps(model, tokens, mask)  # [B, T-1]
    return jnp.sum(logps * completion[:, 1:], axis=-1)  # [B]


def pair_logps(model, tokenizer, rows: Sequence[Mapping[str, str]], batch_size: int = 128):
    """Summed completion log-probs ``(chosen [N], rejected [N])`` under ``model``."""
    chosen, rejected = [], []
    for lo, hi in _chunks(len(rows), batch_size):
        tokens, mask, completion = _encode_pairs(tokenizer, rows[lo:hi])
        logps = np.asarray(_sequence_logps(model, tokens, mask, completion))
        n = hi - lo
        chosen.append(logps[:n])
        rejected.append(logps[n:])
    return np.concatenate(chosen), np.concatenate(rejected)


def preference_accuracy(model, tokenizer, rows: Sequence[Mapping[str, str]], *, reference=None) -> float:
    """Fraction of pairs where the policy prefers ``chosen`` (see the module docstring); ``reference``
    (a model or precomputed ``(chosen, rejected)`` log-probs) switches to DPO's implicit reward."""
    c, r = pair_logps(model, tokenizer, rows)
    if reference is not None:
        rc, rr = reference if isinstance(reference, tuple) else pair_logps(reference, tokenizer, rows)
        c, r = c - rc, r - rr
    return float(np.mean(c > r))


# The reward model's score of each row: the trainer's own function, jitted once here.
@jax.jit
def _scores(reward_model, tokens, mask, completion):
    return sequence_rewards(reward_model, tokens, mask, completion_mask=completion)


def reward_scores(
    reward_model, tokenizer, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 128
) -> np.ndarray:
    """The reward model's score ``[N]`` of each ``[bos] prompt completion [eos]`` (a likelihood-scoring
    reward model also sums the log-probs of ``completion [eos]``)."""
    if len(prompts) != len(completions):
        raise ValueError(f"reward_scores: {len(prompts)} prompts but {len(completions)} completions")
    out = []
    for lo, hi in _chunks(len(prompts), batch_size):
        tokens, mask, completion = _encode(tokenizer, prompts[lo:hi], completions[lo:hi])
        out.append(np.asarray(_scores(reward_model, tokens, mask, completion)))
    return np.concatenate(out)
