"""Chat templates: render a conversation with the tokenizer's template and find the assistant tokens.

Loss masks for conversations must cover exactly the assistant turns. Many templates (and the tiny ones built
in tests) have no ``{% generation %}`` markers, so transformers' ``return_assistant_tokens_mask`` cannot be
relied on. Instead the spans come from rendering prefixes: for the assistant message ``k``,

    start = len(render(messages[:k], add_generation_prompt=True))   # up to the assistant header
    end   = len(render(messages[:k + 1]))                            # through its end-of-turn marker

which holds whenever each rendering is a prefix of the full one (true of common templates). When it is not
(templates that rewrite earlier turns, e.g. stripping old reasoning), the span falls back to the message's
content located in the full rendering, plus an EOS token right after it. Characters map to tokens through the
fast tokenizer's offsets; a token overlapping a span is an assistant token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jrft.data.errors import DataError


def render(tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
    """The chat template applied to ``messages`` as text (no tokenization)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat_template; conversational rows need one")
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _assistant_char_spans(
    tokenizer, messages: Sequence[dict], full: str, first: int
) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    cursor = 0
    for k in range(first, len(messages)):
        if messages[k]["role"] != "assistant":
            continue
        start_text = render(tokenizer, messages[:k], add_generation_prompt=True)
        end_text = render(tokenizer, messages[: k + 1])
        if full.startswith(end_text) and end_text.startswith(start_text) and len(end_text) > len(start_text):
            span = (len(start_text), len(end_text))
        else:  # fallback: locate the content itself
            content = messages[k]["content"]
            start = full.find(content, cursor)
            if start < 0:
                raise ValueError(f"assistant message {k} is not found in the rendered chat template")
            end = start + len(content)
            eos = getattr(tokenizer, "eos_token", None)
            if eos and full.startswith(eos, end):
                end += len(eos)
            span = (start, end)
        spans.append(span)
        cursor = span[1]
    return spans


def encode_chat(
    tokenizer,
    messages: Sequence[dict],
    *,
    first_trained: int = 0,
    source: str = "<chat>",
    row: int | None = None,
    field: str = "messages",
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes a conversation and marks its assistant tokens.

    Args:
      tokenizer: a fast transformers tokenizer with a chat template.
      messages: ``[{"role": ..., "content": ...}, ...]``.
      first_trained: assistant messages before this index are context (mask 0), e.g. the prompt turns of
        a conversational preference row.
      source, row, field: for error messages.

    Returns:
      ``(tokens [T] int32, assistant_mask [T] int8)``.
    """
    try:
        full = render(tokenizer, messages)
        spans = _assistant_char_spans(tokenizer, messages, full, first_trained)
    except Exception as e:  # template errors are user data errors here: name the row
        raise DataError(source, f"chat template failed: {e}", row=row, field=field) from None
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(source, "conversational rows need a fast tokenizer (offsets)", row=row, field=field)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    mask = np.zeros(len(ids), dtype=np.int8)
    for i, (s, e) in enumerate(enc["offset_mapping"]):
        if e > s and any(s < span_end and e > span_start for span_start, span_end in spans):
            mask[i] = 1
    return ids, mask


def encode_chat_prompt(tokenizer, messages: Sequence[dict], **where: Any) -> np.ndarray:
    """Tokens of a conversation followed by the generation prompt (for sampling): ``[T]`` int32."""
    try:
        text = render(tokenizer, messages, add_generation_prompt=True)
    except Exception as e:
        raise DataError(
            where.get("source", "<chat>"), f"chat template failed: {e}", row=where.get("row"), field="prompt"
        ) from None
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
