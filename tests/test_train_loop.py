"""The shared loop: logging, checkpoints, exact resume after SIGKILL, the NaN guard, optimizers."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jrft.train import Checkpointer, LoopOptions, MetricsLogger, NonFiniteError, make_optimizer, train_loop
from jrft.train.optim import make_schedule

TOY = textwrap.dedent(
    """
    import sys, time
    import jax, jax.numpy as jnp, numpy as np, optax
    from jrft.train import Checkpointer, LoopOptions, train_loop

    class Batches:
        def __init__(self, seed):
            self.seed, self.pos = seed, 0
        def __next__(self):
            rng = np.random.default_rng([self.seed, self.pos])
            self.pos += 1
            x = rng.normal(size=(8, 4)).astype(np.float32)
            return x, x @ np.arange(1, 5, dtype=np.float32)
        def state_dict(self):
            return {"pos": self.pos}
        def load_state_dict(self, s):
            self.pos = s["pos"]

    tx = optax.adam(0.05)

    @jax.jit
    def step(state, batch):
        x, y = batch
        def loss_fn(w):
            noise = jax.random.normal(jax.random.fold_in(state["rng"], state["step"]), w.shape) * 1e-3
            return jnp.mean((x @ (w + noise) - y) ** 2)
        loss, g = jax.value_and_grad(loss_fn)(state["w"])
        upd, opt = tx.update(g, state["opt"], state["w"])
        return {"w": optax.apply_updates(state["w"], upd), "opt": opt, "step": state["step"] + 1,
                "rng": state["rng"]}, {"loss": loss}

    def slow_step(state, batch):
        time.sleep(float(sys.argv[3]))
        return step(state, batch)

    w = jnp.zeros(4)
    state = {"w": w, "opt": tx.init(w), "step": jnp.int32(0), "rng": jax.random.key_data(jax.random.key(0))}
    ckpt = Checkpointer(sys.argv[1], keep_last=2)
    opts = LoopOptions(total_steps=int(sys.argv[2]), save_every=4)
    res = train_loop(slow_step, state, Batches(0), options=opts, checkpointer=ckpt)
    np.save(sys.argv[1] + "/final.npy", np.asarray(res.state["w"]))
    """
)


def _run_toy(tmp_path, name, steps, delay):
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    out = tmp_path / name
    return out, [sys.executable, str(script), str(out), str(steps), str(delay)]


def test_sigkill_and_restart_equals_uninterrupted_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    ref_dir, ref_cmd = _run_toy(tmp_path, "ref", 20, 0.0)
    subprocess.run(ref_cmd, check=True, env=env, timeout=120)
    run_dir, cmd = _run_toy(tmp_path, "killed", 20, 0.15)
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 90
    while time.time() < deadline:  # wait for a checkpoint past step 4 to exist, then kill mid-run
        steps = [int(p) for p in os.listdir(run_dir) if p.isdigit()] if run_dir.exists() else []
        if any(s >= 8 for s in steps):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "final.npy").exists(), "the run finished before it could be killed"
    subprocess.run(cmd[:-1] + ["0.0"], check=True, env=env, timeout=120)
    np.testing.assert_array_equal(np.load(run_dir / "final.npy"), np.load(ref_dir / "final.npy"))


class _Counter:
    def __init__(self):
        self.pos = 0

    def __next__(self):
        self.pos += 1
        return self.pos

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    def step(state, batch):
        loss = jnp.float32(np.nan) if batch >= 7 else jnp.float32(1.0 / batch)
        return {"x": state["x"] + 1}, {"loss": loss}

    ckpt = Checkpointer(tmp_path / "ck", keep_last=5)
    with pytest.raises(NonFiniteError, match="'loss' became non-finite.*Last good checkpoint: step 5"):
        train_loop(
            step,
            {"x": jnp.zeros(())},
            _Counter(),
            options=LoopOptions(total_steps=20, log_every=2, save_every=5),
            checkpointer=ckpt,
        )
    assert ckpt.all_steps() == [5]


def test_logger_writes_jsonl_means_and_eval(tmp_path):
    def step(state, batch):
        return state, {"loss": float(batch)}

    logger = MetricsLogger(tmp_path, total_steps=6, progress=False, tensorboard=True)
    train_loop(
        step,
        {},
        _Counter(),
        options=LoopOptions(total_steps=6, log_every=3, eval_every=6),
        logger=logger,
        eval_fn=lambda s: {"acc": 0.5},
    )
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 6]
    assert rows[0]["loss"] == pytest.approx(2.0) and rows[1]["loss"] == pytest.approx(5.0)
    assert rows[2]["eval/acc"] == 0.5
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "tensorboard"))


def test_schedule_warms_up_then_decays():
    sched = make_schedule("cosine", lr=1.0, warmup_steps=10, total_steps=100, min_lr_ratio=0.1)
    # Update count 0 is step 1: warm-up starts above zero (lr / warmup), as optax/TRL users expect.
    assert [float(sched(c)) for c in (0, 1, 9)] == pytest.approx([0.1, 0.2, 1.0])
    assert float(sched(10)) == pytest.approx(1.0)
    constant = make_schedule("constant", lr=2.0, warmup_steps=4, total_steps=100)
    assert [float(constant(c)) for c in range(6)] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    assert float(make_schedule("linear", lr=1.0, warmup_steps=0, total_steps=10)(0)) == 1.0
    assert float(sched(100)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown schedule 'nope'"):
        make_schedule("nope", lr=1.0, warmup_steps=0, total_steps=1)


def test_adamw_skips_decay_on_vectors_and_clips():
    tx, _ = make_optimizer(lr=0.1, total_steps=10, schedule="constant", weight_decay=0.5, max_grad_norm=1.0)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert float(jnp.abs(updates["b"]).max()) == 0.0  # no decay on the bias
    assert float(jnp.abs(updates["w"]).max()) > 0.0  # decay on the matrix
    huge = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), params)
    clipped, _ = optax.clip_by_global_norm(1.0).update(huge, optax.EmptyState())
    assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-5)
