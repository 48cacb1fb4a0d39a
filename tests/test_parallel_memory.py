"""The per-device memory estimate agrees with what sharded parameters really occupy."""

import jax
import pytest
from flax import nnx

from jrft.models import Decoder, ModelConfig
from jrft.models.testing import tiny_hf_config
from jrft.parallel import make_mesh, shard_model
from jrft.parallel.memory import actual_param_bytes_per_device, estimate_memory


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (1, 2, 4), (2, 2, 2)])
def test_param_estimate_matches_sharded_parameters(shape):
    cfg = ModelConfig.from_hf(
        tiny_hf_config(
            "llama",
            vocab_size=256,
            hidden_size=128,
            intermediate_size=256,
            num_key_value_heads=4,
            head_dim=32,
        )
    )
    model = shard_model(Decoder(cfg, rngs=nnx.Rngs(0)), make_mesh(*shape))
    params = nnx.state(model, nnx.Param)
    actual = actual_param_bytes_per_device(params)
    est = estimate_memory(cfg, mesh_shape=shape, batch=8, seq_len=64)
    assert 0.8 * actual <= est.params <= 1.2 * actual, (est.params, actual)
    assert est.optimizer == 2 * est.params and est.grads == est.params


def test_remat_and_cache_terms():
    cfg = ModelConfig.from_hf(tiny_hf_config("llama"))
    none = estimate_memory(cfg, mesh_shape=(1, 1, 1), batch=8, seq_len=64, remat="none")
    full = estimate_memory(cfg, mesh_shape=(1, 1, 1), batch=8, seq_len=64, remat="full")
    assert full.activations < none.activations
    sampling = estimate_memory(
        cfg, mesh_shape=(2, 1, 1), batch=8, seq_len=64, training=False, cache_batch=32, cache_len=128
    )
    # 2 (k, v) x layers x local batch x kv heads x length x head_dim x 4 bytes
    assert sampling.kv_cache == 2 * cfg.num_layers * 16 * cfg.num_kv_heads * 128 * cfg.head_dim * 4
    assert sampling.grads == 0 and sampling.optimizer == 0
    assert "GiB" in sampling.describe()
    with pytest.raises(ValueError, match="unknown remat policy"):
        estimate_memory(cfg, mesh_shape=(1, 1, 1), batch=1, seq_len=1, remat="bogus")
    assert jax.device_count() == 8
