"""Text in, text out: prompts as strings or chat messages -> tokenizer -> ``generate`` -> decoded text.

A prompt is either a string (tokenized as plain text, with the tokenizer's own special-token rule) or a
list of chat messages ``[{"role": ..., "content": ...}, ...]`` rendered by the tokenizer's chat template
with ``add_generation_prompt=True`` (so the completion is the assistant's turn). ``chat=True`` wraps plain
strings as one user message. Works with any transformers tokenizer (in v5
``apply_chat_template(..., tokenize=True)`` returns a ``BatchEncoding``; that and a plain list are accepted).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jrft.sampling.generate import GenerationResult, generate

Prompt = str | Sequence[Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class TextGeneration:
    """Decoded completions ``texts [B*G]`` (each prompt's G samples contiguous) and the token-level result."""

    texts: list[str]
    result: GenerationResult

    def groups(self) -> list[list[str]]:
        """``texts`` as ``[B][G]``."""
        g = self.result.num_samples
        return [self.texts[i : i + g] for i in range(0, len(self.texts), g)]


def _ids_of(encoded) -> list[int]:
    """Token ids from ``apply_chat_template``/``__call__`` output: a BatchEncoding/dict or a list."""
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
    ids = list(ids)
    if ids and not isinstance(ids[0], int | np.integer):  # a batch of one
        ids = list(ids[0])
    return [int(i) for i in ids]


def encode_prompt(tokenizer, prompt: Prompt, *, chat: bool = False) -> list[int]:
    """One prompt's token ids (chat template for message lists, or for strings when ``chat``)."""
    if isinstance(prompt, str):
        if not chat:
            return _ids_of(tokenizer(prompt))
        prompt = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "encode_prompt: the tokenizer has no chat_template, so chat messages cannot be encoded"
        )
    return _ids_of(tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True))


def pad_token_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads id lists into ``(tokens [B, T], mask [B, T])`` int32, T the longest."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("left_pad: every prompt must have at least one token")
    t = max(len(s) for s in sequences)
    tokens = np.full((len(sequences), t), pad_id, np.int32)
    mask = np.zeros((len(sequences), t), np.int32)
    for i, s in enumerate(sequences):
        tokens[i, t - len(s) :] = s
        mask[i, t - len(s) :] = 1
    return tokens, mask


def decode_completions(tokenizer, result: GenerationResult, *, skip_special_tokens: bool = True) -> list[str]:
    """The masked completion tokens of every row, decoded: ``[B*G]`` strings."""
    tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    rows = [tokens[i, : lengths[i]].tolist() for i in range(tokens.shape[0])]
    return tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)


def generate_text(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    chat: bool = False,
    stop_token_ids: Sequence[int] | None = None,
    skip_special_tokens: bool = True,
    **generate_kwargs,
) -> TextGeneration:
    """Encodes ``prompts``, samples with ``jrft.sampling.generate`` and decodes the completions.

    Args:
      model: a ``Decoder`` (or ``(graphdef, state)``).
      tokenizer: a transformers tokenizer (its vocabulary must fit the model's).
      prompts: strings and/or chat message lists.
      max_new_tokens: completion length limit.
      chat: render plain strings through the chat template as one user message.
      stop_token_ids: default: the tokenizer's ``eos_token_id``.
      skip_special_tokens: passed to ``batch_decode``.
      **generate_kwargs: ``num_samples``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``rng``...

    Example:
      >>> chat = [{"role": "user", "content": "2+2="}]
      >>> out = generate_text(model, tok, [chat, "3+3="], max_new_tokens=8, temperature=0.0)
      >>> out.texts[0]
    """
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], Mapping)):
        raise ValueError("generate_text: prompts must be a LIST of prompts (strings or message lists)")
    pad = pad_token_id_of(tokenizer)
    tokens, mask = left_pad([encode_prompt(tokenizer, p, chat=chat) for p in prompts], pad)
    if stop_token_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        stop_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    generate_kwargs.setdefault("pad_token_id", pad)
    result = generate(
        model, tokens, mask, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids, **generate_kwargs
    )
    texts = decode_completions(tokenizer, result, skip_special_tokens=skip_special_tokens)
    return TextGeneration(texts=list(texts), result=result)
