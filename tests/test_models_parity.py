"""Logit parity with transformers' PyTorch implementation (float32) for every supported family, on a batch
mixing left padding and different lengths."""

import jax
import numpy as np
import pytest

from jrft.models import Decoder, ModelConfig, from_pretrained, positions_from_mask
from jrft.models.testing import FAMILY_NAMES, hf_logits, mixed_padding_batch, save_tiny_hf_model

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

CASES = {
    **{family: (family, {}) for family in FAMILY_NAMES},
    "llama3_rope": ("llama", {"rope_parameters": LLAMA3_ROPE, "max_position_embeddings": 512}),
    "llama_linear_rope_bias": (
        "llama",
        {
            "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
            "attention_bias": True,
        },
    ),
    # YaRN (Qwen2.5 long-context style): default attention factor; and DeepSeek's mscale ratio, untruncated
    "qwen2_yarn_rope": (
        "qwen2",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "llama_yarn_mscale_rope": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 5000.0,
                "factor": 8.0,
                "original_max_position_embeddings": 32,
                "beta_fast": 16,
                "beta_slow": 2,
                "mscale": 1.0,
                "mscale_all_dim": 0.5,
                "truncate": False,
            },
            "max_position_embeddings": 256,
        },
    ),
    "qwen3_bias_tied": ("qwen3", {"attention_bias": True, "tie_word_embeddings": True}),
    "gemma_mha": ("gemma", {"num_key_value_heads": 4, "head_dim": 32}),
    "gemma2_default_layer_types": ("gemma2", {"layer_types": None, "num_hidden_layers": 3}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    import transformers

    family, overrides = CASES[case]
    save_tiny_hf_model(family, tmp_path, seed=3, **overrides)
    model = from_pretrained(tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens, mask = mixed_padding_batch(model.config.vocab_size, lengths=(12, 7, 3, 12, 10))
    ours = np.asarray(jax.jit(lambda m, t, a: m(t, a))(model, tokens, mask))
    theirs = hf_logits(reference, tokens, mask)
    valid = mask.astype(bool)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    assert np.abs(theirs[valid]).max() > 1.0  # the logits are not trivially small
    np.testing.assert_array_less(np.abs(ours - theirs)[valid], 1e-4)


def test_left_padding_equals_unpadded_rows(tmp_path):
    save_tiny_hf_model("llama", tmp_path, seed=0)
    model = from_pretrained(tmp_path)
    tokens, mask = mixed_padding_batch(128, lengths=(9, 4))
    batched = np.asarray(model(tokens, mask))
    for row, n in enumerate((9, 4)):
        alone = np.asarray(model(tokens[row : row + 1, -n:]))
        np.testing.assert_allclose(batched[row, -n:], alone[0], atol=1e-5)


def test_explicit_positions_and_hidden(tmp_path):
    save_tiny_hf_model("qwen2", tmp_path, seed=0)
    model = from_pretrained(tmp_path)
    tokens, mask = mixed_padding_batch(128, lengths=(8, 5))
    forward = jax.jit(lambda m, t, a, p: m(t, a, p, return_hidden=True))
    derived = model(tokens, mask)
    explicit, hidden = forward(model, tokens, mask, positions_from_mask(mask))
    np.testing.assert_allclose(np.asarray(derived), np.asarray(explicit), atol=1e-6)
    assert hidden.shape == (2, 8, model.config.hidden_size)
    np.testing.assert_allclose(np.asarray(model.logits_from_hidden(hidden)), np.asarray(derived), atol=1e-6)
    # RoPE is relative: a constant shift changes nothing, stretched distances do
    shifted, _ = forward(model, tokens, mask, positions_from_mask(mask) + 3)
    np.testing.assert_allclose(np.asarray(shifted)[mask == 1], np.asarray(derived)[mask == 1], atol=1e-5)
    stretched, _ = forward(model, tokens, mask, positions_from_mask(mask) * 2)
    assert np.abs(np.asarray(stretched) - np.asarray(derived))[mask == 1].max() > 1e-3


def test_segment_ids_packed_equals_separate():
    from flax import nnx

    from jrft.models.testing import tiny_hf_config

    model = Decoder(ModelConfig.from_hf(tiny_hf_config("llama")), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    a, b = rng.integers(3, 128, (1, 5)), rng.integers(3, 128, (1, 7))
    packed = np.concatenate([a, b], axis=1)
    segments = np.array([[1] * 5 + [2] * 7])
    out = np.asarray(model(packed, segment_ids=segments))
    np.testing.assert_allclose(out[:, :5], np.asarray(model(a)), atol=1e-5)
    np.testing.assert_allclose(out[:, 5:], np.asarray(model(b)), atol=1e-5)


def test_gemma2_window_and_soft_caps_are_used():
    from flax import nnx

    from jrft.models.testing import tiny_hf_config

    cfg = ModelConfig.from_hf(tiny_hf_config("gemma2"))
    assert cfg.sliding_layers == (True, False) and cfg.sliding_window == 4 and cfg.attn_scale == 24**-0.5
    tokens, mask = mixed_padding_batch(128, lengths=(12, 9))
    forward = jax.jit(lambda m, t, a: m(t, a))
    base = np.asarray(forward(Decoder(cfg, rngs=nnx.Rngs(0)), tokens, mask))
    assert np.abs(base).max() <= 3.0  # final soft cap
    for change in ({"sliding_window": None, "sliding_layers": ()}, {"attn_softcap": 1e-4}):
        other = np.asarray(forward(Decoder(cfg.replace(**change), rngs=nnx.Rngs(0)), tokens, mask))
        assert np.abs(other - base)[mask == 1].max() > 1e-4, change


def test_yarn_really_rescales_frequencies_and_cos_sin(tmp_path):
    """The yarn parity cases are not vacuous: frequencies and the cos/sin factor differ from default rope."""
    import dataclasses

    from jrft.models.layers import rope_attention_factor, rope_inv_freq

    family, overrides = CASES["qwen2_yarn_rope"]
    save_tiny_hf_model(family, tmp_path, seed=3, **overrides)
    cfg = from_pretrained(tmp_path).config
    plain = dataclasses.replace(cfg, rope_type="default", rope_scaling=())
    assert rope_attention_factor(cfg) == pytest.approx(0.1 * np.log(4.0) + 1.0)
    assert rope_attention_factor(plain) == 1.0
    yarn, default = rope_inv_freq(cfg), rope_inv_freq(plain)
    assert yarn[0] == default[0] and yarn[-1] == pytest.approx(default[-1] / 4.0)  # kept ... interpolated
