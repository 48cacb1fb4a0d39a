"""The tool-use task of ``jrft demo --objective tools``: multiplication with a ``calc`` tool.

Prompt ``123*456=``. A 0.8M-parameter model trained from scratch cannot multiply three-digit numbers in its
head, but it can copy: the tool-using answer is two model turns around one tool call (Hermes/Qwen format),

    assistant: <tool_call>{"name": "calc", "arguments": {"expression": "123*456"}}</tool_call>
    tool:      56088
    assistant: <answer>56088</answer>

The SFT data mixes such traces with direct answers (``<answer>56088</answer>`` in one turn, as a dataset
written without tools would have them): the model learns both ways, and which one a prompt gets is left to
chance. GRPO, rewarded for a correct final answer only, then finds that the tool pays. Splits are disjoint
by construction as in :mod:`jrft.data.synthetic` (``crc32("a*b")`` picks the held-out problems).
"""

from __future__ import annotations

import ast
import json
import operator
import os
import zlib
from dataclasses import dataclass

import numpy as np

from jrft.data.synthetic import write_jsonl

TOOL_ROLE = "<|tool|>"
# Characters of the prompts, the tool calls' JSON and the tools' results (errors included).
ALPHABET = "0123456789+-*/()=,.:{}[]\"' _abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
TAGS = ("<tool_call>", "</tool_call>", "<answer>", "</answer>")
CALC_SPEC = "jrft.demo.tools_task:calc"

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _evaluate(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Mult) and max(abs(left), abs(right)) > 10**12:
            raise ValueError("numbers too large")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    raise ValueError(f"only integers and + - * // are allowed, got {ast.dump(node)[:40]}")


def calc(expression: str) -> str:
    """Evaluates an integer arithmetic expression.

    Args:
        expression: Integers with + - * // and parentheses, e.g. "123*456".
    """
    if len(expression) > 64:
        raise ValueError("expression longer than 64 characters")
    tree = ast.parse(expression.strip(), mode="eval")
    return str(_evaluate(tree.body))


def tool_call_text(a: int, b: int) -> str:
    """The model's tool-calling turn for ``a*b``."""
    call = {"name": "calc", "arguments": {"expression": f"{a}*{b}"}}
    return f"<tool_call>{json.dumps(call)}</tool_call>"


def answer_text(value: int | str) -> str:
    return f"<answer>{value}</answer>"


@dataclass(frozen=True)
class MultiplicationTask:
    """``digits_a``-digit times ``digits_b``-digit multiplication (operands without leading zeros)."""

    digits_a: int = 3
    digits_b: int = 3
    heldout_fraction: float = 0.1

    def is_heldout(self, a: int, b: int) -> bool:
        return zlib.crc32(f"{a}*{b}".encode()) % 1000 < int(1000 * self.heldout_fraction)

    def sample(self, n: int, *, split: str = "train", seed: int = 0) -> list[tuple[int, int]]:
        """``n`` distinct ``(a, b)`` of ``split`` ("train" or "heldout"), a function of ``seed``."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        bounds = [(10 ** (d - 1), 10**d) for d in (self.digits_a, self.digits_b)]
        rng = np.random.default_rng([seed, 2 if split == "train" else 3])
        seen: set[tuple[int, int]] = set()
        while len(seen) < n:
            a, b = (int(rng.integers(lo, hi)) for lo, hi in bounds)
            if (a, b) not in seen and self.is_heldout(a, b) == (split == "heldout"):
                seen.add((a, b))
        return sorted(seen, key=lambda p: zlib.crc32(f"{seed}:{p}".encode()))


def sft_rows(problems: list[tuple[int, int]], *, tool_fraction: float, seed: int) -> list[dict]:
    """Conversations: a ``tool_fraction`` of them call ``calc`` (then copy its result), the rest answer
    directly. Returns ``{"messages": [...], "used_tool": bool}`` rows."""
    rng = np.random.default_rng([seed, 4])
    rows = []
    for a, b in problems:
        user = {"role": "user", "content": f"{a}*{b}="}
        if rng.random() < tool_fraction:
            messages = [
                user,
                {"role": "assistant", "content": tool_call_text(a, b)},
                {"role": "tool", "name": "calc", "content": str(a * b)},
                {"role": "assistant", "content": answer_text(a * b)},
            ]
        else:
            messages = [user, {"role": "assistant", "content": answer_text(a * b)}]
        rows.append({"messages": messages, "used_tool": len(messages) > 2})
    return rows


def prompt_rows(problems: list[tuple[int, int]]) -> list[dict]:
    """``{"prompt", "answer"}`` rows for GRPO and the held-out evaluation."""
    return [{"prompt": f"{a}*{b}=", "answer": str(a * b)} for a, b in problems]


def write_tool_task_files(
    out: str,
    *,
    num_sft: int,
    num_rl_prompts: int,
    num_heldout: int,
    tool_fraction: float,
    seed: int,
    task: MultiplicationTask | None = None,
) -> dict[str, str]:
    """The demo's files under ``out``: SFT conversations, RL prompts (disjoint from them) and held-out
    prompts. Returns name -> path."""
    task = task or MultiplicationTask()
    train = task.sample(num_sft + num_rl_prompts, split="train", seed=seed)
    files = {
        "sft_train": sft_rows(train[:num_sft], tool_fraction=tool_fraction, seed=seed),
        "prompts_train": prompt_rows(train[num_sft:]),
        "prompts_heldout": prompt_rows(task.sample(num_heldout, split="heldout", seed=seed)),
    }
    os.makedirs(out, exist_ok=True)
    return {name: write_jsonl(rows, os.path.join(out, f"{name}.jsonl")) for name, rows in files.items()}


def tools_tokenizer():
    """A character-level tokenizer with the tags as single tokens and a ``tool`` role for the default chat
    template (``<|role|>content<eos>``; the tool schemas are not rendered: the tiny model learns the one
    tool from its traces)."""
    from jrft.data.local_tokenizer import DEFAULT_SPECIAL_TOKENS, train_tokenizer

    return train_tokenizer(
        kind="char", alphabet=ALPHABET, special_tokens=(*DEFAULT_SPECIAL_TOKENS, TOOL_ROLE), added_tokens=TAGS
    )
