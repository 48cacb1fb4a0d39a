"""``config.json`` shapes of common models, so ``jrft compile`` needs no download (``model.path=llama3-8b``).

Only the fields that decide shapes and numerics are given (from the models' published ``config.json``).
"""

from __future__ import annotations

import os
from typing import Any

_LLAMA3 = dict(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=131072)
_QWEN25 = dict(model_type="qwen2", vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=32768)


def _llama3_rope(factor: float) -> dict:
    return dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=factor,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )


_QWEN_ROPE = dict(rope_type="default", rope_theta=1000000.0)
_FIELDS = tuple(
    "hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads head_dim "
    "tie_word_embeddings".split()
)
# name: (family fields, rope, one value per _FIELDS entry, other overrides)
_TABLE = {
    "llama3-1b": (_LLAMA3, _llama3_rope(32.0), (2048, 8192, 16, 32, 8, 64, True), {}),
    "llama3-3b": (_LLAMA3, _llama3_rope(32.0), (3072, 8192, 28, 24, 8, 128, True), {}),
    "llama3-8b": (_LLAMA3, _llama3_rope(8.0), (4096, 14336, 32, 32, 8, 128, False), {}),
    "qwen2.5-0.5b": (_QWEN25, _QWEN_ROPE, (896, 4864, 24, 14, 2, 64, True), {}),
    "qwen2.5-1.5b": (_QWEN25, _QWEN_ROPE, (1536, 8960, 28, 12, 2, 128, True), {}),
    "qwen2.5-7b": (_QWEN25, _QWEN_ROPE, (3584, 18944, 28, 28, 4, 128, False), {"vocab_size": 152064}),
}
PRESETS: dict[str, dict[str, Any]] = {
    name: {**family, **dict(zip(_FIELDS, values, strict=True)), "rope_parameters": dict(rope), **extra}
    for name, (family, rope, values, extra) in _TABLE.items()
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
