"""Reference offload (``train.offload_reference``): the frozen copy lives in ``pinned_host`` memory with the
policy's sharding, survives donation of the train state, and gives the same reference log-probs.

What CPU can and cannot show: XLA:CPU reports ``pinned_host`` as a memory space (arrays and jit arguments
carry the kind, and ``device_put`` to ``device`` inside jit works), but host and device are the same RAM and
its compiled memory analysis does not split host from device arguments. The saving itself (device memory
freed) shows only on GPU/TPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jrft.config import load_config
from jrft.models import Decoder, ModelConfig
from jrft.models.testing import tiny_hf_config
from jrft.parallel import make_mesh
from jrft.train import reference as reference_mod
from jrft.train.logprobs import make_completion_forward
from jrft.train.placement import place_state
from jrft.train.reference import FrozenModel, host_memory_supported, memory_kinds
from jrft.train.state import split_model

pytestmark = pytest.mark.skipif(not host_memory_supported(), reason="no pinned_host memory on this backend")


def _placed(mesh_shape=(1, 8, 1)):
    cfg = ModelConfig.from_hf(tiny_hf_config("llama", vocab_size=96, hidden_size=32))
    graphdef, params, rest = split_model(Decoder(cfg, rngs=nnx.Rngs(0)))
    (params, rest), _ = place_state((params, rest), make_mesh(*mesh_shape))
    return graphdef, params, rest


def _rollout_batch(b=8, tp=6, tc=10):
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 96, size=(b, tp + tc))
    return {
        "tokens": jnp.asarray(tokens),
        "attention_mask": jnp.ones((b, tp + tc), jnp.int32),
        "completion_mask": jnp.ones((b, tc), jnp.int32),
    }


def test_offloaded_copy_is_in_host_memory_with_the_same_sharding():
    _, params, rest = _placed()
    frozen = FrozenModel(params, rest, offload=True)
    assert memory_kinds(params) == {"device"}
    assert memory_kinds(frozen.params) == {"pinned_host"}
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(frozen.params), strict=True):
        assert b.sharding.spec == a.sharding.spec and b.sharding.mesh == a.sharding.mesh
        assert [s.data.shape for s in b.addressable_shards] == [s.data.shape for s in a.addressable_shards]
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    # the largest parameter (the embedding) really is split over fsdp: each device's host holds 1/8 of it
    largest = max(jax.tree.leaves(frozen.params), key=lambda x: x.size)
    assert largest.addressable_shards[0].data.size * 8 == largest.size
    assert memory_kinds(FrozenModel(params, rest, offload=False).params) == {"device"}


@pytest.mark.parametrize("offload", [False, True])
def test_frozen_copy_survives_donation_of_the_train_params(offload):
    _, params, rest = _placed()
    expected = [np.array(x, copy=True) for x in jax.tree.leaves(params)]  # no view of the buffers
    frozen = FrozenModel(params, rest, offload=offload)
    jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)(params)
    assert all(x.is_deleted() for x in jax.tree.leaves(params))  # really donated
    for x, e in zip(jax.tree.leaves(frozen.params), expected, strict=True):
        np.testing.assert_array_equal(np.asarray(x), e)


def test_offloaded_reference_gives_the_same_logps_and_moves_params_in_the_program():
    graphdef, params, rest = _placed()
    batch = _rollout_batch()
    logps_fn = make_completion_forward(graphdef, temperature=0.9)
    on_device = FrozenModel(params, rest).call(logps_fn, batch)["logps"]
    frozen = FrozenModel(params, rest, offload=True)
    offloaded = frozen.call(logps_fn, batch)["logps"]
    np.testing.assert_allclose(np.asarray(offloaded), np.asarray(on_device), atol=1e-6)
    assert offloaded.sharding.memory_kind == "device"
    frozen.call(logps_fn, batch)
    assert len(frozen._calls) == 1  # one wrapped program per reference function
    # the jitted program takes its parameter arguments from host memory and returns device arrays
    hlo = frozen._calls[logps_fn].lower(frozen.params, rest, batch).as_text()
    assert hlo.count('mhlo.memory_kind = "pinned_host"') == len(jax.tree.leaves(params))


def test_unsupported_backend_is_a_clear_error(monkeypatch):
    _, params, rest = _placed((8, 1, 1))
    monkeypatch.setattr(reference_mod, "host_memory_supported", lambda device=None: False)
    with pytest.raises(ValueError, match="train.offload_reference"):
        FrozenModel(params, rest, offload=True)


def test_config_key():
    assert load_config(None).train.offload_reference is False
    assert load_config(None, ["train.offload_reference=true"]).train.offload_reference is True


ONES = """
def ones(completions, **kwargs):
    return [c.count("1") / max(len(c), 1) for c in completions]
"""


def _online_rows(tiny_task, out, objective, *extra):
    import json

    from jrft.train.runs import run_config

    rewards = out / "ones_reward.py"
    out.mkdir(parents=True, exist_ok=True)
    rewards.write_text(ONES)
    section = "grpo" if objective == "grpo" else "ppo"
    overrides = [
        f"objective={objective}",
        f"output_dir={out}",
        f"model.path={tiny_task['model']}",
        f"data.train={tiny_task['prompts']}",
        "data.format=prompt_only",
        "data.buckets=16",
        "mesh.data=1",
        "optim.lr=3e-3",
        "optim.schedule=constant",
        "train.batch_size=4",
        "train.steps=3",
        "train.log_every=1",
        "train.save_every=0",
        f"{section}.max_new_tokens=8",
        f"{section}.reward_functions=[{{spec: '{rewards}:ones'}}]",
        *extra,
    ]
    run_config(load_config(None, overrides), progress=False)
    return [json.loads(line) for line in open(out / "metrics.jsonl") if '"kl_mean"' in line]


@pytest.mark.slow  # ~22 s each on 2 shared cores
@pytest.mark.parametrize(
    "objective, extra",
    [("grpo", ("grpo.beta=0.1", "grpo.num_generations=4")), ("ppo", ("ppo.kl_coef=0.1", "ppo.num_epochs=1"))],
)
def test_run_with_offloaded_reference_and_chunked_logps_equals_the_default(
    tiny_task, tmp_path, objective, extra
):
    """3 rounds with a KL term: the same KL and losses with both levers on (offload + chunk 3) as off."""
    base = _online_rows(tiny_task, tmp_path / "base", objective, *extra)
    levers = _online_rows(
        tiny_task,
        tmp_path / "levers",
        objective,
        *extra,
        "train.offload_reference=true",
        "train.logits_chunk_size=3",
    )
    assert len(base) == len(levers) == 3
    assert all(r["ref_logps_computed"] == 1.0 for r in levers)
    assert abs(base[-1]["kl_mean"]) > 0  # the policy has moved away from the reference
    for key in ("kl_mean", "loss" if objective == "grpo" else "policy_loss"):
        np.testing.assert_allclose([r[key] for r in levers], [r[key] for r in base], rtol=1e-3, atol=1e-5)


def test_dpo_objective_offloads_its_reference_and_scores_the_same(tiny_task, tmp_path):
    from jrft.config import MeshConfig
    from jrft.data import datasets_from_config
    from jrft.train.placement import device_batch
    from jrft.train.runs.offline import OBJECTIVES
    from jrft.train.runs.setup import build_model, mesh_from_config, optimizer_from_config
    from jrft.train.state import create_train_state

    def objective(*extra):
        cfg = load_config(
            None,
            [
                "objective=dpo",
                f"output_dir={tmp_path}",
                f"model.path={tiny_task['model']}",
                f"data.train={tiny_task['pref_train']}",
                "train.batch_size=4",
                *extra,
            ],
        )
        mesh = mesh_from_config(MeshConfig(1, 8, 1))
        tx, _ = optimizer_from_config(cfg, total_steps=1)
        graphdef, state = create_train_state(build_model(cfg, mesh), tx, seed=0)
        state, _ = place_state(state, mesh)
        return cfg, mesh, OBJECTIVES["dpo"](cfg, graphdef, state)

    from transformers import AutoTokenizer

    cfg, mesh, base = objective()
    _, _, offloaded = objective("train.offload_reference=true", "train.logits_chunk_size=5")
    assert memory_kinds(base.frozen) == {"device"} and memory_kinds(offloaded.frozen) == {"pinned_host"}
    train_ds, _ = datasets_from_config(cfg, AutoTokenizer.from_pretrained(tiny_task["model"]))
    host = next(iter(train_ds.eval_batches(batch_size=8, buckets=16, max_length=cfg.data.max_length)))
    batch = device_batch(host, mesh)
    a, b = base.prepare(batch), offloaded.prepare(batch)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        assert float(jnp.max(jnp.abs(a[key]))) > 1.0  # real sums of token log-probs
        np.testing.assert_allclose(np.asarray(b[key]), np.asarray(a[key]), rtol=1e-5, atol=1e-4)
