"""Tokenizing validated rows into examples, with the over-long policy.

BOS / EOS (plain-text rows): the prompt is ``[bos] + tokens(prompt)`` when ``add_bos`` and the tokenizer has a
BOS token (Llama-style; Qwen has none, so nothing is added), and the completion is
``tokens(completion) + [eos]`` when ``add_eos`` (so the model learns to stop). Prompt and completion are
tokenized separately and concatenated, so the prompt/completion boundary is exact (joint tokenization can
merge across it). Conversational rows use the tokenizer's chat template verbatim (it adds its own BOS and
end-of-turn markers; see :mod:`jrft.data.chat`).

Loss masks are aligned with the tokens: ``loss_mask[t] = 1`` when token ``t`` is a target (predicted from
positions ``< t``). Position 0 is never a target, so packed examples never learn across documents.

Examples (numpy, unpadded):

* ``sft``: ``{"tokens": [T] int32, "loss_mask": [T] int8}``
* ``preference``: ``{"chosen_tokens", "chosen_loss_mask", "rejected_tokens", "rejected_loss_mask"}`` plus
  ``"margin"`` (float, when a margin column is configured) and ``"group"`` (the source row; ranked rows
  expand into several pairs of one group).
* ``ranking`` (ranked rows with ``ranked_as="lists"``): ``{"items_tokens": [K arrays], "items_loss_mask":
  [K arrays], "ranking": [K] best first, "group": row, "max_items": K of the largest row in the dataset}``.
* ``prompt``: ``{"prompt_tokens": [T] int32, "prompt": str | messages, "columns": {extra columns}}``
* ``unpaired`` (KTO): the ``preference`` layout, ``chosen_*`` = the row's own completion, ``rejected_*`` = the
  same prompt with the previous row's completion (the mismatched pair of KTO's KL estimate, TRL's shift by
  one), plus ``"label"`` (True = desirable).
* ``text`` rows become ``sft`` examples: ``[bos] + tokens(text) + [eos]``, every token a target.

Over-long rows (``overlong``): ``truncate`` keeps the end of a prompt and the start of a completion,
``drop`` skips the row (counted in :class:`EncodeStats`), ``fail`` raises a :class:`DataError` naming the row,
the field and the lengths.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jrft.data.chat import encode_chat, encode_chat_prompt
from jrft.data.errors import DataError
from jrft.data.formats import FORMATS, split_implicit_prompt


@dataclass(frozen=True)
class EncodeOptions:
    """Tokenization settings (the data section of the run config, see :class:`jrft.config.DataConfig`)."""

    max_length: int = 1024
    max_prompt_length: int = 512
    max_completion_length: int = 512
    overlong: str = "truncate"  # truncate | drop | fail
    add_bos: bool = True
    add_eos: bool = True
    completion_only_loss: bool = True
    margin_column: str | None = None
    ranked_as: str = "pairs"  # ranked rows: "pairs" (Bradley-Terry) or "lists" (listwise, Plackett-Luce)

    @classmethod
    def from_config(cls, data, **overrides) -> EncodeOptions:
        """From a :class:`jrft.config.DataConfig` (plus e.g. ``completion_only_loss=``)."""
        base = {k: getattr(data, k) for k in ("max_length", "max_prompt_length", "max_completion_length")}
        base.update(overlong=data.overlong, add_bos=data.add_bos, add_eos=data.add_eos)
        base.update(overrides)
        return cls(**base)


@dataclass
class EncodeStats:
    """Counts reported after encoding (the drop count is what ``overlong: drop`` promises to report)."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_rows: list[int] = field(default_factory=list)  # first few dropped row indices, for the report
    # Preference pairs whose chosen and rejected completions encode to the same tokens: kept (they are the
    # user's data) but reported, since such a pair trains at exactly log 2 with zero gradient.
    identical_pairs: int = 0
    identical_rows: list[int] = field(default_factory=list)

    def drop(self, row: int) -> None:
        self.dropped_overlong += 1
        if len(self.dropped_rows) < 10:
            self.dropped_rows.append(row)


class _Dropped(Exception):
    """Internal: this row is skipped under ``overlong: drop``."""


@dataclass
class _Ctx:
    tokenizer: Any
    opts: EncodeOptions
    source: str
    stats: EncodeStats
    row: int = 0
    truncated: bool = False
    cache: dict[str, list[int]] = field(default_factory=dict)  # text -> ids, filled in batches
    previous: Mapping | None = None  # the row before (the last row for row 0): KTO's mismatched KL pairs
    specials: tuple[list[int], list[int]] = ([], [])  # ([bos], [eos]) of the tokenizer, when it has them

    def over(self, field: str, length: int, limit: int, limit_name: str) -> None:
        """Applies the over-long policy to ``field`` of ``length`` tokens over ``limit``."""
        if self.opts.overlong == "fail":
            raise DataError(
                self.source,
                f"{length} tokens exceed data.{limit_name}={limit} (data.overlong=fail)",
                row=self.row,
                field=field,
            )
        if self.opts.overlong == "drop":
            raise _Dropped()
        self.truncated = True

    def text_ids(self, text: str) -> list[int]:
        ids = self.cache.get(text)
        if ids is None:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids

    def bos(self) -> list[int]:
        return self.specials[0] if self.opts.add_bos else []

    def eos(self) -> list[int]:
        return self.specials[1] if self.opts.add_eos else []


def _specials(tokenizer) -> tuple[list[int], list[int]]:
    """``([bos] or [], [eos] or [])``, looked up once per dataset (slow properties on tokenizers)."""
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    return ([] if bos is None else [int(bos)]), ([] if eos is None else [int(eos)])


def _prompt_and_completion(ctx: _Ctx, prompt, completion, field: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Tokens, completion mask and prompt length of ``prompt + completion`` (strings or messages)."""
    if isinstance(prompt, list):
        tokens, mask = encode_chat(
            ctx.tokenizer,
            prompt + completion,
            first_trained=len(prompt),
            source=ctx.source,
            row=ctx.row,
            field=field,
        )
        trained = np.flatnonzero(mask)
        n_prompt = int(trained[0]) if len(trained) else len(tokens)
        return tokens, mask, n_prompt
    p = ctx.bos() + ctx.text_ids(prompt)
    c = ctx.text_ids(completion)
    if not c:
        raise DataError(ctx.source, "completion tokenizes to nothing", row=ctx.row, field=field)
    eos = ctx.eos()
    if eos and c[-1] != eos[0]:
        c = c + eos
    tokens = np.asarray(p + c, dtype=np.int32)
    mask = np.concatenate([np.zeros(len(p), np.int8), np.ones(len(c), np.int8)])
    return tokens, mask, len(p)


def _finish_sft(ctx: _Ctx, tokens: np.ndarray, mask: np.ndarray, field: str) -> dict | None:
    limit = ctx.opts.max_length
    if len(tokens) > limit:
        ctx.over(field, len(tokens), limit, "max_length")
        tokens, mask = tokens[:limit], mask[:limit]
    if not ctx.opts.completion_only_loss:
        mask = np.ones_like(mask)
    mask = mask.copy()
    mask[0] = 0  # position 0 has no context to be predicted from
    if not mask.any():
        if ctx.truncated:  # truncation left no completion token: the row is useless, count it as dropped
            raise _Dropped()
        raise DataError(ctx.source, "no tokens to learn from", row=ctx.row, field=field)
    return {"tokens": tokens.astype(np.int32), "loss_mask": mask.astype(np.int8)}


def _encode_prompt_completion(ctx: _Ctx, row: Mapping) -> list[dict]:
    tokens, mask, _ = _prompt_and_completion(ctx, row["prompt"], row["completion"], "completion")
    return [_finish_sft(ctx, tokens, mask, "completion")]


def _encode_messages(ctx: _Ctx, row: Mapping) -> list[dict]:
    tokens, mask = encode_chat(ctx.tokenizer, row["messages"], source=ctx.source, row=ctx.row)
    return [_finish_sft(ctx, tokens, mask, "messages")]


def _pair_side(ctx: _Ctx, prompt, completion, field: str) -> tuple[np.ndarray, np.ndarray]:
    """One side of a preference pair, fitted to the prompt / completion / total limits."""
    o = ctx.opts
    tokens, mask, n_prompt = _prompt_and_completion(ctx, prompt, completion, field)
    p_tok, c_tok, c_mask = tokens[:n_prompt], tokens[n_prompt:], mask[n_prompt:]
    if len(p_tok) > o.max_prompt_length:
        ctx.over("prompt", len(p_tok), o.max_prompt_length, "max_prompt_length")
        p_tok = p_tok[-o.max_prompt_length :]  # keep the end, nearest the answer
    if len(c_tok) > o.max_completion_length:
        ctx.over(field, len(c_tok), o.max_completion_length, "max_completion_length")
        c_tok, c_mask = c_tok[: o.max_completion_length], c_mask[: o.max_completion_length]
    if len(p_tok) + len(c_tok) > o.max_length:
        ctx.over(field, len(p_tok) + len(c_tok), o.max_length, "max_length")
        keep = max(o.max_length - len(p_tok), 0)
        c_tok, c_mask = c_tok[:keep], c_mask[:keep]
    if not c_mask.any():
        raise _Dropped()  # truncation removed the whole completion
    tokens = np.concatenate([p_tok, c_tok]).astype(np.int32)
    mask = np.concatenate([np.zeros(len(p_tok), np.int8), c_mask]).astype(np.int8)
    mask[0] = 0
    return tokens, mask


def _pair(ctx: _Ctx, row: Mapping, prompt, chosen, rejected, fields=("chosen", "rejected")) -> dict:
    ct, cm = _pair_side(ctx, prompt, chosen, fields[0])
    rt, rm = _pair_side(ctx, prompt, rejected, fields[1])
    ex = {"chosen_tokens": ct, "chosen_loss_mask": cm, "rejected_tokens": rt, "rejected_loss_mask": rm}
    ex["group"] = ctx.row
    if np.array_equal(ct, rt) and np.array_equal(cm, rm):
        ctx.stats.identical_pairs += 1
        if len(ctx.stats.identical_rows) < 10:
            ctx.stats.identical_rows.append(ctx.row)
    col = ctx.opts.margin_column
    if col is not None:
        value = row.get(col)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(
                ctx.source, f"margin column: expected a number, got {value!r}", row=ctx.row, field=col
            )
        ex["margin"] = float(value)
    return ex


def _encode_preference(ctx: _Ctx, row: Mapping) -> list[dict]:
    return [_pair(ctx, row, row["prompt"], row["chosen"], row["rejected"])]


def _encode_ranked(ctx: _Ctx, row: Mapping) -> list[dict]:
    order, texts = row["ranking"], row["completions"]
    pairs = []
    for a in range(len(order)):
        for b in range(a + 1, len(order)):
            fields = (f"completions[{order[a]}]", f"completions[{order[b]}]")
            pairs.append(_pair(ctx, row, row["prompt"], texts[order[a]], texts[order[b]], fields))
    return pairs


def _encode_ranked_list(ctx: _Ctx, row: Mapping) -> list[dict]:
    items = [
        _pair_side(ctx, row["prompt"], text, f"completions[{j}]") for j, text in enumerate(row["completions"])
    ]
    return [
        {
            "items_tokens": [t for t, _ in items],
            "items_loss_mask": [m for _, m in items],
            "ranking": list(row["ranking"]),
            "group": ctx.row,
        }
    ]


def _encode_prompt_only(ctx: _Ctx, row: Mapping) -> list[dict]:
    prompt = row["prompt"]
    if isinstance(prompt, list):
        tokens = encode_chat_prompt(ctx.tokenizer, prompt, source=ctx.source, row=ctx.row)
    else:
        tokens = np.asarray(ctx.bos() + ctx.text_ids(prompt), dtype=np.int32)
    limit = ctx.opts.max_prompt_length
    if len(tokens) > limit:
        ctx.over("prompt", len(tokens), limit, "max_prompt_length")
        tokens = tokens[-limit:]
    columns = {k: v for k, v in row.items() if k != "prompt"}
    return [{"prompt_tokens": tokens, "prompt": prompt, "columns": columns}]


def _encode_text(ctx: _Ctx, row: Mapping) -> list[dict]:
    ids = ctx.bos() + ctx.text_ids(row["text"]) + ctx.eos()
    tokens = np.asarray(ids, dtype=np.int32)
    return [_finish_sft(ctx, tokens, np.ones(len(tokens), np.int8), "text")]


def _encode_implicit_preference(ctx: _Ctx, row: Mapping) -> list[dict]:
    prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"])
    return [_pair(ctx, row, prompt, chosen, rejected)]


def _encode_unpaired(ctx: _Ctx, row: Mapping) -> list[dict]:
    """KTO: the row's completion on the ``chosen_*`` side, and on the ``rejected_*`` side a mismatched one
    (this prompt with the previous row's completion, TRL's shift) for the KL estimate; plus ``label``."""
    other = ctx.previous["completion"]
    if isinstance(other, list) != isinstance(row["prompt"], list):
        kinds = ("a string", "a conversation")
        raise DataError(
            ctx.source,
            "unpaired rows must be all strings or all conversations: the KL term pairs this prompt "
            f"({kinds[isinstance(row['prompt'], list)]}) with the previous row's completion "
            f"({kinds[isinstance(other, list)]})",
            row=ctx.row,
            field="completion",
        )
    example = _pair(ctx, row, row["prompt"], row["completion"], other, ("completion", "completion (KL pair)"))
    example["label"] = bool(row["label"])
    return [example]


ENCODERS: dict[str, Callable[[_Ctx, Mapping], list[dict]]] = {
    "prompt_completion": _encode_prompt_completion,
    "messages": _encode_messages,
    "preference": _encode_preference,
    "ranked": _encode_ranked,
    "prompt_only": _encode_prompt_only,
    "text": _encode_text,
    "implicit_preference": _encode_implicit_preference,
    "unpaired": _encode_unpaired,
}
assert set(ENCODERS) == set(FORMATS)


_TEXT_FIELDS = ("prompt", "completion", "chosen", "rejected", "completions", "text")


def _pretokenize(tokenizer, rows: Sequence[Mapping], chunk: int = 1024) -> dict[str, list[int]]:
    """Token ids of every plain-text field, tokenized in batches (a fast tokenizer's batch call is several
    times faster than one call per string). Conversational fields go through the chat template instead."""
    texts: dict[str, None] = {}
    for row in rows:
        for name in _TEXT_FIELDS:
            value = row.get(name)
            if isinstance(value, str):
                texts[value] = None
            elif name == "completions" and isinstance(value, list):
                texts.update((v, None) for v in value if isinstance(v, str))
    unique = list(texts)
    cache: dict[str, list[int]] = {}
    for start in range(0, len(unique), chunk):
        part = unique[start : start + chunk]
        for text, ids in zip(part, tokenizer(part, add_special_tokens=False)["input_ids"], strict=True):
            cache[text] = list(ids)
    return cache


def encode_rows(
    tokenizer, rows: Sequence[Mapping], format: str, opts: EncodeOptions, *, source: str = "<rows>"
) -> tuple[list[dict], EncodeStats]:
    """Tokenizes validated rows of ``format`` into examples (see the module docstring).

    Returns:
      ``(examples, stats)``; rows dropped by the over-long policy are counted in ``stats``.
    """
    if opts.overlong not in ("truncate", "drop", "fail"):
        raise ValueError(f"overlong must be truncate, drop or fail, got {opts.overlong!r}")
    if opts.ranked_as not in ("pairs", "lists"):
        raise ValueError(f"ranked_as must be 'pairs' or 'lists', got {opts.ranked_as!r}")
    encoder = _encode_ranked_list if format == "ranked" and opts.ranked_as == "lists" else ENCODERS[format]
    stats = EncodeStats(rows=len(rows))
    examples: list[dict] = []
    cache, specials = _pretokenize(tokenizer, rows), _specials(tokenizer)
    for i, row in enumerate(rows):
        ctx = _Ctx(
            tokenizer, opts, source, stats, row=i, cache=cache, specials=specials, previous=rows[i - 1]
        )
        try:
            out = encoder(ctx, row)
        except _Dropped:
            stats.drop(i)
            continue
        stats.truncated += int(ctx.truncated)
        examples.extend(out)
    stats.examples = len(examples)
    if examples and "items_tokens" in examples[0]:  # ranking lists are padded to one K for the whole dataset
        k = max(len(e["ranking"]) for e in examples)
        for e in examples:
            e["max_items"] = k
    return examples, stats
