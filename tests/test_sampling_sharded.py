"""Sharded sampling on 8 fake CPU devices (tests/conftest.py) equals single-device sampling."""

import tempfile

import jax
import numpy as np
import pytest

from jrft.models import from_pretrained
from jrft.models import testing as mt
from jrft.parallel import make_mesh
from jrft.sampling import generate


@pytest.fixture(scope="module")
def setup():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    path = mt.save_tiny_hf_model("qwen2", tempfile.mkdtemp(prefix="jrft_sampling_sharded_"), seed=4)
    tokens, mask = mt.mixed_padding_batch(128, seed=5, lengths=(9, 4, 7, 2, 8, 5, 3, 6))
    kw = dict(max_new_tokens=36, num_samples=2, temperature=1.0, top_k=50, stop_token_ids=[2], rng=11)
    single = generate(from_pretrained(path), tokens, mask, **kw)
    return path, tokens, mask, kw, single


@pytest.mark.parametrize("axes", [dict(data=8), pytest.param(dict(data=2, fsdp=4), marks=pytest.mark.slow)])
def test_sharded_equals_single_device(setup, axes):
    path, tokens, mask, kw, single = setup
    mesh = make_mesh(**axes)
    model = from_pretrained(path, mesh=mesh)  # parameters sharded by the logical rules (fsdp splits embed)
    res = generate(model, tokens, mask, mesh=mesh, **kw)
    assert len(res.tokens.sharding.device_set) == 8  # rows really spread over the devices
    np.testing.assert_array_equal(res.tokens, single.tokens)
    np.testing.assert_array_equal(res.mask, single.mask)
    np.testing.assert_array_equal(res.finish_reason, single.finish_reason)
    np.testing.assert_allclose(res.logprobs, single.logprobs, atol=1e-5)


def test_gathered_weights_equal_and_leave_the_decode_loop(setup):
    """``gather_weights``: the fsdp-sharded weights are gathered once per call, so the decode loop holds no
    all-gather (read from the compiled program); tokens equal single-device sampling. Scan layout and
    unfused projections: the choices an accelerator gets."""
    from jrft.aot.hlo import loop_collective_shapes
    from jrft.sampling import Sampler

    path, tokens, mask, kw, single = setup
    mesh = make_mesh(data=1, fsdp=8)
    model = from_pretrained(path, mesh=mesh)
    accel = dict(layout="scan", fuse_projections=False)
    res = generate(model, tokens, mask, mesh=mesh, gather_weights=True, **accel, **kw)
    np.testing.assert_array_equal(res.tokens, single.tokens)
    np.testing.assert_allclose(res.logprobs, single.logprobs, atol=1e-5)

    from flax import nnx

    def loop_gathers(gather):
        lowered = Sampler().lower(
            nnx.split(model), 8, tokens.shape[1], max_new_tokens=36, num_samples=2, mesh=mesh,
            top_k=50, gather_weights=gather, **accel,
        )  # fmt: skip
        return set(loop_collective_shapes(lowered.compile().as_text(), outer_only=True))

    # every weight matrix of one layer (either orientation) and the embedding
    weights = {tuple(v.shape[-2:]) for v in jax.tree.leaves(nnx.state(model, nnx.Param)) if v.ndim >= 2}
    weights |= {s[::-1] for s in weights}
    assert not loop_gathers(True) & weights  # only activations (rows x vocab) are gathered per step
    assert loop_gathers(False) & weights  # left sharded, XLA gathers weights inside the decode loop
