"""PPO (RLHF) end to end on a tiny random model: reward rises, value loss falls, both value-model modes,
a `jrft reward` export as the reward model, and resume equals the uninterrupted run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jrft.config import load_config
from jrft.models import from_pretrained
from jrft.train.logprobs import make_completion_forward
from jrft.train.objectives import ppo
from jrft.train.runs import run_config
from jrft.train.runs.offline import run_offline
from jrft.train.state import split_model

REWARDS = '''
def ones(completions, **kwargs):
    """Fraction of the completion's characters that are '1': easy to raise."""
    return [c.count("1") / max(len(c), 1) for c in completions]
'''


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppo_rewards") / "ppo_rewards.py"
    path.write_text(REWARDS)
    return str(path)


def _config(tiny_task, out, *extra):
    return load_config(
        None,
        [
            "objective=ppo",
            f"output_dir={out}",
            f"model.path={tiny_task['model']}",
            f"data.train={tiny_task['prompts']}",
            "data.format=prompt_only",
            "data.buckets=16",
            "mesh.data=1",
            "optim.lr=3e-3",
            "optim.schedule=constant",
            "optim.warmup_steps=0",
            "train.batch_size=16",
            "train.log_every=1",
            "train.save_every=0",
            "ppo.max_new_tokens=8",
            "ppo.num_epochs=2",
            "ppo.num_mini_batches=2",
            "ppo.log_completions_every=5",
            *extra,
        ],
    )


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if "score/mean" in line]


STEPS = 24


@pytest.fixture(scope="module")
def separate_run(tiny_task, reward_file, tmp_path_factory):
    """A separate value model (started from the policy), the `ones` reward function, STEPS rounds."""
    out = tmp_path_factory.mktemp("ppo_separate")
    funcs = f"ppo.reward_functions=[{{spec: '{reward_file}:ones'}}]"
    result = run_config(_config(tiny_task, out, funcs, f"train.steps={STEPS}"), progress=False)
    return out, funcs, result


def test_ppo_raises_the_reward_and_the_value_loss_falls(separate_run):
    out, _, result = separate_run
    rows = _rows(out)
    assert len(rows) == STEPS and result.step == STEPS
    scores = [r["score/mean"] for r in rows]
    assert np.mean(scores[-5:]) > np.mean(scores[:5]) + 0.1, scores
    # The fresh value head starts far off (loss ~3); it learns the returns (explained variance rises).
    value_losses = [r["value_loss"] for r in rows]
    assert np.mean(value_losses[-5:]) < 0.1 * np.mean(value_losses[:3]), value_losses
    explained = [r["explained_variance"] for r in rows]
    assert np.mean(explained[-5:]) > np.mean(explained[:3]) + 0.5, explained
    assert all(0 <= r["clip_frac"] <= 1 and 0 <= r["value_clip_frac"] <= 1 for r in rows)
    # k1 KL is an estimate (a batch mean may be < 0); the policy that learned to emit '1's has drifted.
    assert all(r["ref_logps_computed"] == 1.0 for r in rows)
    assert np.mean([r["kl_mean"] for r in rows[-5:]]) > 0.1
    assert all(r["policy_grad_norm"] > 0 and r["value_grad_norm"] > 0 for r in rows)
    # Each round is num_epochs x num_mini_batches = 4 optimizer steps of the policy and of the value model.
    assert int(result.state.policy.step) == int(result.state.value.step) == 4 * STEPS
    # The export is the policy as a causal LM; the completions table holds the score of each row.
    config = json.load(open(out / "export" / "config.json"))
    assert config["architectures"][0].endswith("ForCausalLM")
    table = [json.loads(line) for line in open(out / "completions.jsonl")]
    assert table and {"prompt", "completion", "score", "reward/ones"} <= set(table[0])


def test_kill_and_resume_equals_the_uninterrupted_run(tiny_task, separate_run, tmp_path):
    """In process: a run stopped after its checkpoint at STEPS/2, restarted with the same output_dir, ends
    with the same policy and value parameters as the uninterrupted run (the loop restores state + data)."""
    reference_out, funcs, reference = separate_run
    out = tmp_path / "resumed"
    first = run_config(_config(tiny_task, out, funcs, f"train.steps={STEPS // 2}"), progress=False)
    assert first.resumed_from is None
    second = run_config(_config(tiny_task, out, funcs, f"train.steps={STEPS}"), progress=False)
    assert second.resumed_from == STEPS // 2
    for a, b in zip(jax.tree.leaves(reference.state), jax.tree.leaves(second.state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    tail = [r["score/mean"] for r in _rows(out)][-STEPS // 2 :]
    assert tail == [r["score/mean"] for r in _rows(reference_out)][-STEPS // 2 :]


def test_reward_model_export_is_the_reward_with_a_value_head(tiny_task, tmp_path):
    """`jrft reward` trains and exports a reward model; PPO with value_model=head scores with it."""
    rm_out = tmp_path / "rm"
    rm_cfg = load_config(
        None,
        [
            "objective=reward",
            f"output_dir={rm_out}",
            f"model.path={tiny_task['model']}",
            f"data.train={tiny_task['pref_train']}",
            "data.buckets=32",
            "data.max_length=64",
            "mesh.data=1",
            "optim.lr=1e-3",
            "train.batch_size=8",
            "train.steps=3",
            "train.save_every=0",
            "train.log_every=1",
            "reward.likelihood_coef=0.5",  # the score adds 0.5 x the completion's log-prob
            "reward.sft_coef=0.1",  # + 0.1 x the chosen answers' NLL in the loss
        ],
    )
    run_offline(rm_cfg, progress=False)
    with open(rm_out / "metrics.jsonl") as f:
        assert all(json.loads(line)["nll_chosen"] > 0 for line in f)  # the run's loss has the NLL term
    rm_path = str(rm_out / "export")
    assert "score.weight" in load_file(os.path.join(rm_path, "model.safetensors"))
    with open(os.path.join(rm_path, "config.json")) as f:
        assert json.load(f)["jrft_reward_likelihood_coef"] == 0.5  # PPO's scorer reads it from here

    out = tmp_path / "ppo_head"
    cfg = _config(
        tiny_task,
        out,
        "train.steps=3",
        "ppo.value_model=head",
        f"ppo.reward_model={rm_path}",
        "ppo.missing_eos_penalty=1.0",
        "ppo.kl_coef=0.0",
    )
    result = run_config(cfg, progress=False)
    rows = _rows(out)
    assert len(rows) == 3 and result.state.value is None
    for r in rows:
        assert np.isfinite(r["rm_score/mean"]) and r["rm_score/mean"] != 0.0
        # score = reward-model score - missing_eos_penalty on truncated completions (no reward functions)
        assert r["score/mean"] == pytest.approx(r["rm_score/mean"] - r["truncated_fraction"], abs=1e-5)
        assert np.isfinite(r["value_loss"]) and np.isfinite(r["loss"])
        assert r["ref_logps_computed"] == 0.0 and r["kl_mean"] == 0.0  # kl_coef = 0: no reference at all
    # The value head is trained with the policy but not exported: the export is a plain causal LM.
    tensors = load_file(os.path.join(out / "export", "model.safetensors"))
    assert "score.weight" not in tensors
    assert int(result.state.policy.step) == 3 * 4


def test_score_and_values_sit_at_the_right_positions(tiny_task):
    """The reward is the head at the last completion token and V(s_j) the head at position Tp - 1 + j,
    whatever the padding: compare padded rows with the same tokens unpadded."""
    model = from_pretrained(tiny_task["model"], scalar_head=True, seed=3)
    graphdef, params, rest = split_model(model)
    prompt, completion = [5, 6, 7], [8, 9]
    # Row layout: prompt left-padded to Tp = 5, completion right-padded to Tc = 4.
    tokens = jnp.asarray([[0, 0, *prompt, *completion, 0, 0]], jnp.int32)
    attention = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 0, 0]], jnp.int32)
    batch = {"tokens": tokens, "attention_mask": attention, "completion_mask": jnp.asarray([[1, 1, 0, 0]])}
    plain = model.score(jnp.asarray([prompt + completion], jnp.int32))[0]  # [5] unpadded
    score = ppo.make_score_fn(graphdef)(params, rest, batch)
    np.testing.assert_allclose(score[0], plain[-1], rtol=1e-5)
    values = make_completion_forward(graphdef, temperature=1.0, logps=False, values=True)(params, rest, batch)
    np.testing.assert_allclose(values["values"][0, :2], plain[2:4], rtol=1e-5, atol=1e-6)


def test_advantages_follow_gae_with_the_kl_penalty():
    """One sequence, gamma = lam = 1, no whitening: advantages are reward-to-go minus values."""
    fn = ppo.make_advantage_fn(
        kl_coef=0.5, kl_estimator="k1", gamma=1.0, lam=1.0, whiten_rewards=False, whiten_advantages=False
    )
    old = jnp.asarray([[-1.0, -2.0, -0.5, 0.0]])
    ref = jnp.asarray([[-1.5, -2.0, -1.0, 0.0]])
    values = jnp.asarray([[0.1, 0.2, 0.3, 9.0]])
    mask = jnp.asarray([[1, 1, 1, 0]])
    batch = {"scores": jnp.asarray([2.0]), "old_logps": old, "ref_logps": ref, "old_values": values}
    out, metrics = fn({**batch, "completion_mask": mask})
    rewards = np.asarray([-0.25, 0.0, -0.25 + 2.0])  # -kl_coef * (old - ref), score on the last real token
    to_go = np.cumsum(rewards[::-1])[::-1]
    np.testing.assert_allclose(out["advantages"][0, :3], to_go - np.asarray([0.1, 0.2, 0.3]), rtol=1e-6)
    np.testing.assert_allclose(out["returns"][0, :3], to_go, rtol=1e-6)
    assert float(out["advantages"][0, 3]) == 0.0
    np.testing.assert_allclose(metrics["kl_sum"], 1.0, rtol=1e-6)


@pytest.mark.slow
def test_sharded_ppo_round_equals_single_device(tiny_task, reward_file, tmp_path):
    assert jax.device_count() == 8
    funcs = f"ppo.reward_functions=[{{spec: '{reward_file}:ones'}}]"
    finals = []
    for name, mesh in (("one", ["mesh.data=1"]), ("sharded", ["mesh.data=2", "mesh.fsdp=4"])):
        cfg = _config(tiny_task, tmp_path / name, funcs, "train.steps=2", "optim.lr=1e-3", *mesh)
        finals.append(jax.tree.leaves(run_config(cfg, progress=False).state))
    # Sharded reductions sum in another order; Adam turns those last-bit differences of near-zero gradients
    # into differences of up to ~lr / 20 after 8 updates: compare at that scale.
    for a, b in zip(*finals, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(tiny_task, reward_file, tmp_path):
    """`jrft ppo` SIGKILLed after a checkpoint, then rerun, exports the uninterrupted run's weights."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, like a user's run
    env["JAX_PLATFORMS"] = "cpu"

    def config(out):
        cfg = {
            "model": {"path": tiny_task["model"]},
            "output_dir": str(out),
            "data": {"train": tiny_task["prompts"], "format": "prompt_only", "buckets": 16},
            "optim": {"lr": 3e-3, "warmup_steps": 2},
            "train": {"steps": 12, "batch_size": 8, "log_every": 1, "save_every": 3},
            "ppo": {
                "max_new_tokens": 8,
                "num_epochs": 2,
                "num_mini_batches": 2,
                "reward_functions": [{"spec": f"{reward_file}:ones"}],
            },
        }
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return [sys.executable, "-m", "jrft.cli", "ppo", str(path), "--no-progress"]

    ref_out, run_out = tmp_path / "ref", tmp_path / "run"
    subprocess.run(config(ref_out), env=env, check=True, timeout=600, capture_output=True)
    proc = subprocess.Popen(config(run_out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            ckpt = run_out / "checkpoints"
            if ckpt.exists() and any(p.isdigit() and int(p) >= 3 for p in os.listdir(ckpt)):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (run_out / "export").exists()
    done = subprocess.run(config(run_out), env=env, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from checkpoint at step" in done.stdout + done.stderr
    ref = load_file(str(ref_out / "export" / "model.safetensors"))
    run = load_file(str(run_out / "export" / "model.safetensors"))
    assert ref.keys() == run.keys()
    for name in ref:
        np.testing.assert_array_equal(ref[name], run[name], err_msg=name)
