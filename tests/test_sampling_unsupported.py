"""The sampler refuses models whose features its decode step lacks, instead of sampling wrongly."""

import numpy as np
import pytest
from flax import nnx

from jrft.models import Decoder, ModelConfig
from jrft.models.testing import tiny_hf_config
from jrft.sampling import generate


def test_gemma2_generation_is_refused_with_a_clear_error():
    cfg = ModelConfig.from_hf(
        tiny_hf_config(
            "gemma2",
            hidden_act="gelu_pytorch_tanh",
            tie_word_embeddings=True,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            sliding_window=8,
        )
    )
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="does not implement .*gemma2"):
        generate(model, np.ones((1, 4), np.int32), None, max_new_tokens=2, temperature=0.0)
