"""Packed update rows (``train.pack_rows``): the layout, and the same losses and gradients as the padded batch
for GRPO (every aggregation, GSPO's sequence ratio, KL), PPO (policy + value head) and DPO, with and without
gradient accumulation."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import param_arrays
from flax import nnx

from jrft.config import load_config
from jrft.models import Decoder, ModelConfig
from jrft.models.testing import tiny_hf_config
from jrft.train.logprobs import make_completion_forward, pair_sequence_logps
from jrft.train.objectives import dpo, grpo, kto, pairs, ppo
from jrft.train.packing import first_fit_decreasing, pack_pairs, pack_rollout, pack_sequences
from jrft.train.runs import run_config
from jrft.train.step import split_micro_batches

VOCAB = 64


def _model(scalar_head=False):
    cfg = ModelConfig.from_hf(tiny_hf_config("llama", vocab_size=VOCAB, hidden_size=32))
    return nnx.split(Decoder(cfg, rngs=nnx.Rngs(0), scalar_head=scalar_head), nnx.Param, ...)


def _rollout(n=8, tp=7, tc=12, seed=0):
    """Rollout rows: left-padded prompts of 2..tp tokens, completions of 1..tc tokens (host arrays)."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(2, tp + 1, size=n)
    completion = rng.integers(1, tc + 1, size=n)
    completion[0] = tc  # one row fills the width
    cols = np.arange(tp + tc)[None]
    attention = ((cols >= tp - prompt[:, None]) & (cols < tp + completion[:, None])).astype(np.int32)
    tokens = rng.integers(3, VOCAB, size=(n, tp + tc)) * attention
    completion_mask = attention[:, tp:].copy()
    completion_mask[1] = 0  # a fully masked row (DAPO overlong filtering)
    return tokens.astype(np.int32), attention, completion_mask


def _value_and_grad(loss_fn, normalizers, graphdef, params, rest, batch, grad_accum):
    """What ``jrft.train.step`` computes: the sum over micro-batches of loss, metrics and gradients."""
    norms = normalizers(batch)

    def f(p, micro):
        return loss_fn(nnx.merge(graphdef, p, rest), micro, norms, None)

    step = jax.jit(jax.value_and_grad(f, has_aux=True))
    micro = split_micro_batches(batch, grad_accum)
    out = [step(params, jax.tree.map(lambda x, i=i: x[i], micro)) for i in range(grad_accum)]
    return jax.tree.map(lambda *xs: sum(xs), *out)


def _assert_close(a, b, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


def test_first_fit_decreasing_and_strided_micro_batches():
    assert first_fit_decreasing([3, 8, 5, 2, 6], 10) == [[1, 3], [4, 0], [2]]
    seqs = [np.full(n, k + 1) for k, n in enumerate([5, 3, 4, 2, 6, 1])]
    out = pack_sequences(seqs, 8, groups=2, pad_id=0)
    r = out["packed_tokens"].shape[0]
    assert r % 2 == 0 and out["packed_tokens"].shape[1] == 8
    for k, s in enumerate(seqs):  # every sequence sits in a row of its own micro-batch, positions from 0
        row = out["seq_row"][k] * 2 + k % 2
        cols = slice(out["seq_start"][k], out["seq_start"][k] + len(s))
        np.testing.assert_array_equal(out["packed_tokens"][row, cols], s)
        np.testing.assert_array_equal(out["packed_positions"][row, cols], np.arange(len(s)))
        assert len(set(out["packed_segment_ids"][row, cols])) == 1
    assert out["packed_attention_mask"].sum() == sum(len(s) for s in seqs)
    assert np.all((out["packed_segment_ids"] == 0) == (out["packed_attention_mask"] == 0))
    with pytest.raises(ValueError, match="longer than the packed row length"):
        pack_sequences([np.ones(9)], 8)


def test_packed_rollout_is_denser_and_its_index_finds_the_completion_tokens():
    tokens, attention, _ = _rollout(n=16)
    tc = 12
    packed = pack_rollout(tokens, attention, tc)
    assert packed["packed_tokens"].size < tokens.size
    flat = packed["packed_tokens"].reshape(-1)
    real = attention[:, -tc:] > 0
    # the position after the predicting one holds the completion token itself
    np.testing.assert_array_equal(flat[packed["pack_index"] + 1][real], tokens[:, -tc:][real])


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_update_inputs_feed_the_packed_rows_themselves(grad_accum):
    """A round's update gets the packed rows (fewer than the rollout's), for all rows and for a mini-batch."""
    from types import SimpleNamespace

    from jrft.parallel.mesh import make_mesh
    from jrft.train.rounds import RoundOptions, UpdateInputs

    tokens, attention, completion_mask = _rollout(n=16)
    rollout = SimpleNamespace(
        tokens=tokens, attention_mask=attention, completion_mask=completion_mask, num_rows=16
    )
    mesh = make_mesh(data=1, devices=jax.devices()[:1])
    options = RoundOptions(
        mesh=mesh, state_sharding=None, pad_token_id=0, grad_accum=grad_accum, pack_rows=True
    )
    inputs = UpdateInputs(rollout, options)
    for rows in (np.arange(16), np.arange(16)[::2]):
        out = inputs.mini(rows)
        assert out["pack_index"].shape == (len(rows), completion_mask.shape[1])
        assert out["packed_tokens"].shape[0] < len(rows) or len(rows) < 16  # 4 rows a micro-batch: may not
    padded = UpdateInputs(rollout, dataclasses.replace(options, pack_rows=False))
    assert padded.mini(np.arange(16))["tokens"].shape == tokens.shape
    assert inputs.padded_fraction() < padded.padded_fraction()


@pytest.mark.parametrize(
    "aggregation, level, grad_accum",
    [
        ("grpo", "token", 1),
        ("dr_grpo", "token", 2),
        ("bnpo", "sequence", 1),  # GSPO: a per-sequence ratio
        ("dapo", "token", 4),
        ("sapo", "token", 2),
    ],
)
def test_grpo_packed_equals_padded(aggregation, level, grad_accum):
    graphdef, params, rest = _model()
    tokens, attention, completion_mask = _rollout()
    n, tc = completion_mask.shape
    rng = np.random.default_rng(1)
    rows = {
        "completion_mask": completion_mask,
        "advantages": rng.normal(size=n).astype(np.float32),
        "old_logps": (-rng.uniform(0.5, 5.0, size=(n, tc))).astype(np.float32),
        "ref_logps": (-rng.uniform(0.5, 5.0, size=(n, tc))).astype(np.float32),
    }
    padded = {**rows, "tokens": tokens, "attention_mask": attention}
    packed = {**rows, **pack_rollout(tokens, attention, tc, groups=grad_accum)}
    loss_fn = grpo.make_loss_fn(
        temperature=0.9,
        clip_eps_low=0.2,
        clip_eps_high=0.28,
        beta=0.04,
        kl_estimator="k3",
        aggregation=aggregation,
        importance_level=level,
        max_completion_length=tc,
    )
    results = [
        _value_and_grad(
            loss_fn, grpo.normalizers, graphdef, params, rest, jax.tree.map(jnp.asarray, b), grad_accum
        )
        for b in (padded, packed)
    ]
    (loss0, m0), g0 = results[0]
    (loss1, m1), g1 = results[1]
    assert abs(float(loss0)) > 1e-3
    np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-5, atol=1e-6)
    _assert_close(m1, m0)
    _assert_close(g1, g0)
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g0)) > 1e-4


def test_completion_forward_and_ppo_loss_packed_equal_padded():
    """Old log-probs and values (one forward), then PPO's policy + value-head loss and gradients."""
    graphdef, params, rest = _model(scalar_head=True)
    tokens, attention, completion_mask = _rollout(seed=2)
    n, tc = completion_mask.shape
    padded = {"tokens": tokens, "attention_mask": attention, "completion_mask": completion_mask}
    packed = {"completion_mask": completion_mask, **pack_rollout(tokens, attention, tc)}
    forward = make_completion_forward(graphdef, temperature=0.9, values=True)
    out0 = forward(params, rest, jax.tree.map(jnp.asarray, padded))
    out1 = forward(params, rest, jax.tree.map(jnp.asarray, packed))
    keep = completion_mask > 0
    for key in ("logps", "values"):
        np.testing.assert_allclose(np.asarray(out1[key])[keep], np.asarray(out0[key])[keep], atol=1e-5)
    rng = np.random.default_rng(3)
    rows = {
        "old_logps": np.asarray(out0["logps"]) + rng.normal(scale=0.1, size=(n, tc)).astype(np.float32),
        "old_values": rng.normal(size=(n, tc)).astype(np.float32),
        "advantages": rng.normal(size=(n, tc)).astype(np.float32),
        "returns": rng.normal(size=(n, tc)).astype(np.float32),
    }
    loss_fn = ppo.make_loss_fn(terms=("policy", "value"), temperature=0.9)
    packed2 = {"completion_mask": completion_mask, **pack_rollout(tokens, attention, tc, groups=2)}
    results = [
        _value_and_grad(
            loss_fn, ppo.normalizers, graphdef, params, rest, jax.tree.map(jnp.asarray, {**b, **rows}), 2
        )
        for b in (padded, packed2)
    ]
    (loss0, m0), g0 = results[0]
    (loss1, m1), g1 = results[1]
    np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-5, atol=1e-6)
    _assert_close(m1, m0)
    _assert_close(g1, g0)


def _pairs(b=6, t=16, seed=4):
    rng = np.random.default_rng(seed)
    out = {}
    for side in ("chosen", "rejected"):
        lengths = rng.integers(4, t + 1, size=b)
        attention = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)  # right padding
        out[f"{side}_tokens"] = (rng.integers(3, VOCAB, size=(b, t)) * attention).astype(np.int32)
        out[f"{side}_attention_mask"] = attention
        out[f"{side}_loss_mask"] = attention * (np.arange(t)[None] >= 3)  # a 3-token prompt
    out["ref_chosen_logps"] = (-rng.uniform(10, 40, size=b)).astype(np.float32)
    out["ref_rejected_logps"] = (-rng.uniform(10, 40, size=b)).astype(np.float32)
    out["group"] = np.arange(b, dtype=np.int32)
    return out


@pytest.mark.parametrize(
    "loss_type, grad_accum",
    [("sigmoid", 1), ("ipo", 2), pytest.param("simpo", 3, marks=pytest.mark.slow), ("orpo", 2)],
)  # simpo (~8 s) in the slow suite: orpo covers the reference-free packed path
def test_dpo_packed_equals_padded(loss_type, grad_accum):
    graphdef, params, rest = _model()
    batch = _pairs()
    packed = pack_pairs(batch, groups=grad_accum)
    assert packed["packed_tokens"].size <= 2 * batch["chosen_tokens"].size
    # the whole packed batch (a reference forward before the step) gives every pair's sums too
    model = nnx.merge(graphdef, params, rest)
    whole = [pair_sequence_logps(model, jax.tree.map(jnp.asarray, b)) for b in (batch, packed)]
    _assert_close(whole[1], whole[0], atol=1e-4)
    loss_fn = dpo.make_loss_fn(beta=0.1, loss_type=loss_type, sft_weight=0.5)
    results = [
        _value_and_grad(
            loss_fn, pairs.normalizers, graphdef, params, rest, jax.tree.map(jnp.asarray, b), grad_accum
        )
        for b in (batch, packed)
    ]
    (loss0, m0), g0 = results[0]
    (loss1, m1), g1 = results[1]
    np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-5, atol=1e-6)
    _assert_close(m1, m0, atol=1e-4)  # summed log-probs of ~40 nats
    _assert_close(g1, g0)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_kto_packed_equals_padded(grad_accum):
    """KTO: its batch-level KL reference point (over the rows a call sees) comes out the same as well."""
    graphdef, params, rest = _model()
    batch = {**_pairs(b=8, seed=5), "label": np.asarray([1, 0, 1, 1, 0, 0, 1, 0], np.float32)}
    loss_fn = kto.make_loss_fn(beta=0.1, desirable_weight=1.0, undesirable_weight=1.33)
    results = [
        _value_and_grad(
            loss_fn, kto.normalizers, graphdef, params, rest, jax.tree.map(jnp.asarray, b), grad_accum
        )
        for b in (batch, pack_pairs(batch, groups=grad_accum))
    ]
    (loss0, m0), g0 = results[0]
    (loss1, m1), g1 = results[1]
    np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-5, atol=1e-6)
    _assert_close(m1, m0, atol=1e-4)
    _assert_close(g1, g0)


# -- runs -------------------------------------------------------------------------------------------------

REWARDS = """
def ones(completions, **kwargs):
    return [c.count("1") / max(len(c), 1) for c in completions]
"""


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"eval/' not in line]


def _grpo_config(tiny_task, reward_file, out, *extra):
    return load_config(
        None,
        [
            "objective=grpo",
            f"output_dir={out}",
            f"model.path={tiny_task['model']}",
            f"data.train={tiny_task['prompts']}",
            "data.format=prompt_only",
            "data.buckets=16",
            "optim.lr=3e-3",
            "optim.schedule=constant",
            "train.batch_size=8",  # 32 rows over 8 devices: 2 x 16 rows to pack in multiples of 4
            "train.micro_batch_size=4",  # 2 micro-batches per mini-batch: packed per micro-batch
            "train.log_every=1",
            "train.save_every=0",
            "grpo.num_generations=4",
            "grpo.max_new_tokens=24",
            "grpo.temperature=1.5",  # varied completion lengths
            "grpo.beta=0.04",  # reference log-probs on packed rows
            "grpo.num_iterations=2",  # old log-probs on packed rows, two updates
            f"grpo.reward_functions=[{{spec: '{reward_file}:ones'}}]",
            *extra,
        ],
    )


@pytest.mark.slow  # ~30 s: two runs of two rounds
def test_grpo_run_with_packed_rows_equals_padded(tiny_task, tmp_path):
    reward_file = tmp_path / "rewards.py"
    reward_file.write_text(REWARDS)
    finals, rows = {}, {}
    for name, extra in (("padded", []), ("packed", ["train.pack_rows=true"])):
        cfg = _grpo_config(tiny_task, reward_file, tmp_path / name, "train.steps=2", *extra)
        finals[name] = param_arrays(run_config(cfg, progress=False).state)
        rows[name] = _rows(tmp_path / name)
    assert len(rows["packed"]) == 2
    first = {k: [r[0][k] for r in rows.values()] for k in ("loss", "kl_mean", "completion_length")}
    for key, (padded, packed) in first.items():  # the same rollout, the same update
        np.testing.assert_allclose(packed, padded, rtol=1e-4, atol=1e-6, err_msg=key)
    for r_padded, r_packed in zip(rows["padded"], rows["packed"], strict=True):
        assert 0 < r_packed["padded_fraction"] < r_padded["padded_fraction"] < 1
    # Adam's early steps are ~lr * g / |g|: a gradient entry near zero turns a 1e-9 difference in summation
    # order into ~1e-5 after four updates (measured 1.4e-5 on 1 of 8192 entries at lr 3e-3)
    for a, b in zip(finals["padded"], finals["packed"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)


@pytest.mark.slow  # ~15 s; the unit tests above cover the packed DPO loss and gradients
def test_dpo_run_with_packed_rows_equals_padded(tiny_task, tmp_path):
    losses = {}
    for name, extra in (("padded", []), ("packed", ["train.pack_rows=true"])):
        cfg = load_config(
            None,
            [
                "objective=dpo",
                f"output_dir={tmp_path / name}",
                f"model.path={tiny_task['model']}",
                f"data.train={tiny_task['pref_train']}",
                "data.buckets=64",  # rows padded to 64: room for two pair sequences of the addition task
                "mesh.data=1",  # one device: packed rows need not come in multiples of 8
                "optim.lr=1e-3",
                "train.batch_size=8",
                "train.micro_batch_size=4",
                "train.steps=2",
                "train.log_every=1",
                "train.save_every=0",
                *extra,
            ],
        )
        run_config(cfg, progress=False)
        losses[name] = _rows(tmp_path / name)
    np.testing.assert_allclose(
        [r["loss"] for r in losses["packed"]], [r["loss"] for r in losses["padded"]], rtol=1e-4, atol=1e-6
    )
    for packed, padded in zip(losses["packed"], losses["padded"], strict=True):
        assert 0 <= packed["padded_fraction"] <= padded["padded_fraction"] < 1
    fractions = {k: sum(r["padded_fraction"] for r in v) for k, v in losses.items()}
    assert fractions["packed"] < fractions["padded"]


@pytest.mark.slow  # ~30 s: two PPO runs
def test_ppo_run_with_packed_rows_equals_padded(tiny_task, tmp_path):
    reward_file = tmp_path / "rewards.py"
    reward_file.write_text(REWARDS)
    finals, rows = {}, {}
    for name, extra in (("padded", []), ("packed", ["train.pack_rows=true"])):
        cfg = load_config(
            None,
            [
                "objective=ppo",
                f"output_dir={tmp_path / name}",
                f"model.path={tiny_task['model']}",
                f"data.train={tiny_task['prompts']}",
                "data.format=prompt_only",
                "data.buckets=16",
                "mesh.data=1",
                "optim.lr=1e-3",
                "train.batch_size=16",
                "train.micro_batch_size=4",  # 2 micro-batches per mini-batch of 8
                "train.steps=2",
                "train.log_every=1",
                "train.save_every=0",
                "ppo.max_new_tokens=24",
                "ppo.temperature=1.5",
                "ppo.kl_coef=0.05",
                "ppo.num_epochs=2",
                "ppo.num_mini_batches=2",
                f"ppo.reward_functions=[{{spec: '{reward_file}:ones'}}]",
                *extra,
            ],
        )
        finals[name] = [np.asarray(x) for x in jax.tree.leaves(run_config(cfg, progress=False).state)]
        rows[name] = _rows(tmp_path / name)
    for key in ("loss", "value_loss", "kl_mean"):  # the first round: same rollout, same updates
        np.testing.assert_allclose(rows["packed"][0][key], rows["padded"][0][key], rtol=1e-4, err_msg=key)
    for r_padded, r_packed in zip(rows["padded"], rows["packed"], strict=True):
        assert 0 < r_packed["padded_fraction"] < r_padded["padded_fraction"] < 1
    for a, b in zip(finals["padded"], finals["packed"], strict=True):  # see test_train_ppo's sharded test
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
