"""``jrft kto`` end to end on the tiny addition task: unpaired rows made from the preference pairs (correct
trace desirable, corrupted trace undesirable); KTO must separate their implicit rewards on held-out rows."""

import json
import os

import numpy as np
import pytest

from jrft.commands.train import run
from jrft.data import synthetic


def _unpaired(path, out, seed):
    rows = [json.loads(line) for line in open(path)]
    flat = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in rows]
    flat += [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in rows]
    order = np.random.default_rng(seed).permutation(len(flat))  # desirable and undesirable mixed
    return synthetic.write_jsonl([flat[i] for i in order], out)


@pytest.fixture(scope="module")
def kto_data(tiny_task):
    root = tiny_task["root"]
    return (
        _unpaired(tiny_task["pref_train"], root / "kto_train.jsonl", 0),
        _unpaired(tiny_task["pref_eval"], root / "kto_eval.jsonl", 1),
    )


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.slow
def test_kto_separates_desirable_from_undesirable(tiny_task, kto_data, tmp_path, capsys):
    out = tmp_path / "kto"
    train, evals = kto_data
    argv = [
        "configs/kto.yaml",
        f"output_dir={out}",
        f"model.path={tiny_task['model']}",
        f"data.train={train}",
        f"data.eval={evals}",
        "data.buckets=32",
        "data.max_length=64",
        "learning_rate=1e-3",
        "optim.warmup_steps=2",
        "max_steps=30",
        "train.batch_size=16",
        "train.log_every=5",
        "train.eval_every=30",
        "train.eval_batches=4",
        "train.save_every=0",
        "kto.beta=0.1",
        "--no-progress",
    ]
    assert run("kto", argv) == 0
    rows = _rows(out)
    train_rows = [r for r in rows if "rewards/desirable" in r]
    final = [r for r in rows if "eval/rewards/desirable" in r][-1]
    margin = final["eval/rewards/desirable"] - final["eval/rewards/undesirable"]
    first = train_rows[0]["rewards/desirable"] - train_rows[0]["rewards/undesirable"]
    print(f"KTO reward margin: first logged train step {first:.3f}, held-out after 30 steps {margin:.3f}")
    # beta * (log-ratio gap): 0.25 is a 2.5-nat gap between desirable and undesirable held-out completions.
    assert margin > 0.25 and margin > first + 0.2, (first, final)
    assert all(np.isfinite(r["loss"]) for r in train_rows) and final["eval/kl"] >= 0
    assert os.path.exists(out / "export" / "config.json")


def test_kto_precomputed_reference_equals_the_live_one(tiny_task, kto_data, tmp_path):
    """``kto.precompute_ref_logps`` (one reference pass before training) gives the live reference's
    losses: the same values feed the same loss."""
    train, _ = kto_data
    losses = {}
    for name in ("live", "precomputed"):
        out = tmp_path / name
        argv = [
            "configs/kto.yaml",
            f"output_dir={out}",
            f"model.path={tiny_task['model']}",
            f"data.train={train}",
            "data.eval=null",
            "data.buckets=32",
            "data.max_length=64",
            "optim.lr=1e-3",
            "train.steps=2",
            "train.batch_size=8",
            "train.log_every=1",
            "train.save_every=0",
            f"kto.precompute_ref_logps={name == 'precomputed'}",
            "--no-progress",
        ]
        assert run("kto", argv) == 0
        losses[name] = [r["loss"] for r in _rows(out) if "loss" in r]
    np.testing.assert_allclose(losses["precomputed"], losses["live"], rtol=1e-5)
