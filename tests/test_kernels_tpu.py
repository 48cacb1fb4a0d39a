"""On the target: programs compiled for a v5e:2x4 topology from this host (libtpu, no TPU) run attention
through the Pallas splash kernel (its ``tpu_custom_call``s in the optimized HLO: forward, dq, dkv), sharded
per chip without gathering the batch; a sliding-window model keeps the XLA path and says why. The sampler's
decode loop calls the ragged decode kernel."""

import json
import logging

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jrft.models import kernels
from jrft.models.layers import attention, causal_mask
from jrft.models.testing import tiny_hf_config

pytest.importorskip("libtpu")


def _v5e_mesh(data=1, fsdp=8, tensor=1):
    from jrft.aot import topology_devices
    from jrft.parallel import make_mesh

    return make_mesh(data=data, fsdp=fsdp, tensor=tensor, devices=topology_devices("v5e:2x4"))


@pytest.mark.parametrize("axes", [(1, 8, 1), (2, 2, 2)])  # (data, fsdp, tensor): heads split over tensor
def test_attention_gradients_compile_to_splash_for_v5e(axes):
    mesh = _v5e_mesh(*axes)
    b, t, h, kv, dh = 8, 256, 4, 2, 16

    def grads(q, k, v, valid, seg):
        slots = jnp.arange(t)
        mask = causal_mask(valid, slots, slots, seg)
        loss = lambda q, k, v: attention(q, k, v, mask, 0.25, causal_block=64).astype(jnp.float32).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    shapes = [(b, t, h, dh), (b, kv, t, dh), (b, kv, t, dh), (b, t), (b, t)]
    dtypes = [jnp.bfloat16] * 3 + [jnp.int32] * 2
    args = [jax.ShapeDtypeStruct(s, d, sharding=batch) for s, d in zip(shapes, dtypes, strict=True)]
    with kernels.recording() as seen, jax.set_mesh(mesh):
        hlo = jax.jit(grads).lower(*args).compile().as_text()
    assert hlo.count("tpu_custom_call") >= 3  # forward, dq and dkv kernels
    assert "all-gather" not in hlo  # each chip attends over its own rows
    assert kernels.describe(seen) == "splash (pallas-tpu)"


@pytest.mark.parametrize("family, impl", [("llama", "splash (pallas-tpu)"), ("gemma2", "xla-blocked")])
def test_jrft_compile_sft_step_uses_splash_on_v5e(tmp_path, capsys, caplog, family, impl):
    from jrft.cli import main

    model = tmp_path / "tiny"
    model.mkdir()
    extra = {"sliding_window": 64} if family == "gemma2" else {}
    (model / "config.json").write_text(json.dumps(tiny_hf_config(family, vocab_size=256, **extra)))
    args = ["compile", "sft", "configs/sft.yaml", f"model.path={model}", "mesh.data=1", "mesh.fsdp=8"]
    args += ["train.batch_size=8", "data.max_length=128", "train.logits_chunk_size=16"]
    args += ["--topology", "v5e:2x4", "--dump", str(tmp_path / "hlo")]
    with caplog.at_level(logging.INFO, logger="jrft.models.kernels"):
        assert main(args) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sft/train_step:")]
    assert ": fits  total" in line and f"attention: {impl}" in line  # jrft compile names the kernel
    hlo = (tmp_path / "hlo" / "sft_train_step.hlo.txt").read_text()
    assert f"attention: {impl}" in caplog.text
    if family == "llama":
        assert hlo.count("tpu_custom_call") >= 3
    else:  # Gemma 2's sliding-window layers: the kernel is not used, with the reason logged
        assert "tpu_custom_call" not in hlo and "sliding-window" in caplog.text


def _tiny_sampler_on_v5e(max_new_tokens, decode_attention=None):
    """The tiny Llama sampler (8 prompts x G = 2, 16-token prompts) compiled for v5e:2x4 with the choices a
    TPU mesh gets: ``(optimized HLO, attention choices traced)``."""
    from flax import nnx

    from jrft.aot import abstract
    from jrft.models import Decoder, ModelConfig
    from jrft.parallel import state_shardings
    from jrft.sampling import Sampler

    mesh = _v5e_mesh()
    cfg = ModelConfig.from_hf(tiny_hf_config("llama", vocab_size=256))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)))
    state = abstract(state, state_shardings(state, mesh))
    with kernels.recording() as seen:
        compiled = Sampler().lower(
            (graphdef, state), 8, 16, max_new_tokens=max_new_tokens, num_samples=2, mesh=mesh,
            decode_attention=decode_attention,
        ).compile()  # fmt: skip
    return compiled.as_text(), seen


def test_sampler_decode_loop_calls_the_ragged_kernel_on_v5e():
    """On a TPU mesh the decode step's attention is the ragged kernel, called inside the decode loop, and
    named as such; ``decode_attention='xla'`` keeps the XLA step (no kernel in the loop)."""
    from jrft.aot.hlo import custom_calls_in_loops

    hlo, seen = _tiny_sampler_on_v5e(1024)
    assert custom_calls_in_loops(hlo, "tpu_custom_call", outer_only=True) == 1
    assert "ragged-decode (pallas-tpu)" in kernels.describe(seen)
    hlo, seen = _tiny_sampler_on_v5e(64, decode_attention="xla")  # 2 segments: a quick compile
    assert custom_calls_in_loops(hlo, "tpu_custom_call", outer_only=True) == 0
    assert "ragged-decode" not in kernels.describe(seen)
