"""ModelConfig: reading transformers config.json for every family, writing it back, clear errors."""

import json

import pytest

from jrft.models import ModelConfig
from jrft.models.testing import FAMILY_NAMES, tiny_hf_config


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_from_hf_to_hf_round_trip(family):
    cfg = ModelConfig.from_hf(tiny_hf_config(family))
    assert cfg.family == family and cfg.num_layers == 2 and cfg.head_dim == 16
    again = ModelConfig.from_hf(cfg.to_hf())
    assert again == cfg
    hash(cfg)  # static data of jitted functions must be hashable
    assert cfg.to_hf()["bos_token_id"] == 1  # unmodelled keys survive


def test_family_variants():
    assert ModelConfig.from_hf(tiny_hf_config("qwen2")).qkv_bias
    assert not ModelConfig.from_hf(tiny_hf_config("qwen2")).o_bias
    assert ModelConfig.from_hf(tiny_hf_config("qwen3")).qk_norm
    gemma = ModelConfig.from_hf(tiny_hf_config("gemma"))
    assert gemma.norm_plus_one and gemma.scale_embeddings and gemma.tie_embeddings
    assert gemma.hidden_act == "gelu_pytorch_tanh"
    llama = ModelConfig.from_hf(tiny_hf_config("llama", attention_bias=True))
    assert llama.qkv_bias and llama.o_bias


def test_legacy_rope_keys_and_llama3():
    legacy = tiny_hf_config("llama", rope_theta=500000.0)
    del legacy["rope_parameters"]
    legacy["rope_scaling"] = {
        "type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = ModelConfig.from_hf(legacy)
    assert cfg.rope_type == "llama3" and cfg.rope_theta == 500000.0 and cfg.rope_params["factor"] == 8.0
    assert cfg.to_hf()["rope_parameters"]["rope_type"] == "llama3"


def test_reads_directory_and_names_bad_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config("qwen3")))
    assert ModelConfig.from_hf(tmp_path).family == "qwen3"
    (tmp_path / "config.json").write_text(json.dumps({**tiny_hf_config("llama"), "model_type": "mamba"}))
    with pytest.raises(ValueError, match=r"config\.json.*unsupported model_type 'mamba'"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf(tmp_path / "nowhere")


def test_unsupported_options_are_named():
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig.from_hf(tiny_hf_config("qwen2", use_sliding_window=True))
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf(tiny_hf_config("llama", rope_parameters={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig.from_hf(tiny_hf_config("llama", num_key_value_heads=3))
    bad = tiny_hf_config("llama")
    del bad["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_hf(bad)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_num_params_matches_transformers(family):
    from jrft.models.testing import build_hf_model

    overrides = {"attention_bias": True} if family in ("llama", "qwen3") else {}
    hf_config = tiny_hf_config(family, **overrides)
    hf = build_hf_model(hf_config, noise=0.0)
    assert ModelConfig.from_hf(hf_config).num_params == sum(p.numel() for p in hf.parameters())
