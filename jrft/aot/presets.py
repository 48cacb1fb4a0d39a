"""``config.json`` shapes of common models, so ``jrft compile`` needs no download (``model.path=llama3-8b``).

Only the fields that decide shapes and numerics are given (from the models' published ``config.json``).
"""

from __future__ import annotations

import os
from typing import Any

_LLAMA3 = dict(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=131072)
_LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
_QWEN25 = dict(model_type="qwen2", vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=32768)
_QWEN_ROPE = dict(rope_type="default", rope_theta=1000000.0)

PRESETS: dict[str, dict[str, Any]] = {
    "llama3-1b": dict(
        _LLAMA3,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        rope_parameters=dict(_LLAMA3_ROPE),
    ),
    "llama3-3b": dict(
        _LLAMA3,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
        rope_parameters=dict(_LLAMA3_ROPE),
    ),
    "llama3-8b": dict(
        _LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        rope_parameters=dict(_LLAMA3_ROPE, factor=8.0),
    ),
    "qwen2.5-0.5b": dict(
        _QWEN25,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_parameters=dict(_QWEN_ROPE),
    ),
    "qwen2.5-1.5b": dict(
        _QWEN25,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_parameters=dict(_QWEN_ROPE),
    ),
    "qwen2.5-7b": dict(
        _QWEN25,
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        rope_parameters=dict(_QWEN_ROPE),
    ),
}


def model_config(path_or_preset: str):
    """A ``jrft.models.ModelConfig`` from a preset name (:data:`PRESETS`), a directory holding
    ``config.json`` or a ``config.json`` path (no weights needed). Unknown: ``ValueError`` naming both."""
    from jrft.models import ModelConfig

    if path_or_preset in PRESETS:
        return ModelConfig.from_hf(PRESETS[path_or_preset])
    if os.path.exists(path_or_preset):
        return ModelConfig.from_hf(path_or_preset)
    raise ValueError(
        f"model.path={path_or_preset!r}: neither a local config.json / model directory nor a preset "
        f"({', '.join(sorted(PRESETS))})"
    )
