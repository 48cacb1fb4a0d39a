"""Helpers for tests (reused across jrft's test files): tiny configs of every family, random transformers
checkpoints saved locally, and reference logits from transformers' PyTorch implementation.

``torch`` is imported only inside the functions that build transformers models (it is a test dependency).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

FAMILY_NAMES = ("llama", "qwen2", "qwen3", "gemma", "gemma2")

_TINY: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_act="silu", tie_word_embeddings=False),
    "qwen2": dict(hidden_act="silu", tie_word_embeddings=False),
    "qwen3": dict(hidden_act="silu", tie_word_embeddings=False),
    "gemma": dict(hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True),
    # small window and soft caps so that both bite on tiny inputs
    "gemma2": dict(
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        query_pre_attn_scalar=24,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
    ),
}


def tiny_hf_config(family: str, **overrides) -> dict[str, Any]:
    """A ``config.json`` dict for a tiny model of ``family`` (llama | qwen2 | qwen3 | gemma | gemma2).

    Defaults: vocab 128, hidden 64, MLP 96, 2 layers, 4 heads of 16, 2 kv heads. ``rope_parameters`` may be
    overridden (e.g. llama3 scaling); any key may be overridden.
    """
    if family not in _FAMILY_DEFAULTS:
        raise ValueError(f"tiny_hf_config: unknown family {family!r}; choose from {FAMILY_NAMES}")
    cfg = {"model_type": family, **_TINY, **_FAMILY_DEFAULTS[family]}
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    cfg.update(overrides)
    return cfg


def build_hf_model(config: dict[str, Any], seed: int = 0, *, noise: float = 0.1, classifier: bool = False):
    """A random transformers PyTorch model (float32, eval mode) for ``config``.

    Every parameter is perturbed with ``noise`` (norm weights, biases and q/k norms included), so a parity
    test exercises each tensor rather than the ones/zeros transformers initialises them with.
    """
    import torch
    import transformers

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    if classifier:
        hf_config.num_labels = 1
        model = transformers.AutoModelForSequenceClassification.from_config(hf_config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    model = model.float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return model


def save_tiny_hf_model(
    family: str,
    path: str | os.PathLike,
    seed: int = 0,
    *,
    tie_embeddings: bool | None = None,
    max_shard_size: str | int | None = None,
    **overrides,
) -> str:
    """Saves a random tiny transformers model of ``family`` to ``path`` (safetensors); returns the path.

    ``max_shard_size`` (e.g. ``"20KB"``) forces a sharded checkpoint with an index file.
    """
    if tie_embeddings is not None:
        overrides["tie_word_embeddings"] = tie_embeddings
    model = build_hf_model(tiny_hf_config(family, **overrides), seed)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(os.fspath(path), **kwargs)
    return os.fspath(path)


def hf_logits(
    model, tokens: np.ndarray, attention_mask: np.ndarray | None = None, positions=None
) -> np.ndarray:
    """float32 logits ``[B, T, V]`` of a transformers model, with position ids derived from the mask the way
    ``jrft`` does (so left-padded rows agree)."""
    import torch

    tokens = np.asarray(tokens)
    if attention_mask is None:
        attention_mask = np.ones_like(tokens)
    if positions is None:
        positions = np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(attention_mask, dtype=torch.long),
            position_ids=torch.as_tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()


def mixed_padding_batch(vocab_size: int, seed: int = 0, lengths=(12, 7, 3, 10), pad_id: int = 0):
    """A left-padded batch of mixed lengths: ``(tokens [B, T], attention_mask [B, T])`` int32."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    tokens = np.full((len(lengths), t), pad_id, np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, t - n :] = rng.integers(3, vocab_size, n)
        mask[i, t - n :] = 1
    return tokens, mask
