"""jrft.losses on a mesh: batch-sharded inputs over 8 (fake CPU) devices give the single-device results,
with both automatic (GSPMD) and explicit sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jrft.losses as L

B, T, V, G = 16, 6, 11, 4


def inputs():
    rng = np.random.default_rng(7)
    logps = jnp.asarray(-rng.uniform(0.2, 3.0, size=(B, T)), jnp.float32)
    lengths = rng.integers(1, T + 1, size=B)
    return {
        "logits": jnp.asarray(rng.normal(size=(B, T, V)), jnp.bfloat16),
        "tokens": jnp.asarray(rng.integers(0, V, size=(B, T))),
        "logps": logps,
        "old": logps + 0.1 * jnp.asarray(rng.normal(size=(B, T)), jnp.float32),
        "ref": logps + 0.1 * jnp.asarray(rng.normal(size=(B, T)), jnp.float32),
        "rewards": jnp.asarray(rng.normal(size=B), jnp.float32),
        "mask": jnp.asarray((np.arange(T)[None] < lengths[:, None]).astype(np.float32)),
    }


def every_family(x):
    """One call into each family, the way a trainer would chain them."""
    logps, old, ref, mask = x["logps"], x["old"], x["ref"], x["mask"]
    adv = L.group_advantages(x["rewards"], G, baseline="rloo", scale="batch")
    grpo = lambda lp: L.grpo_loss(lp, old, ref, adv, mask, clip_eps_low=0.2, beta=0.04, aggregation="grpo")[0]
    gspo = L.grpo_loss(logps, old, ref, adv, mask, clip_eps_low=0.2, beta=0.0, importance_level="sequence")[0]
    token_logps = L.token_logprobs(x["logits"], x["tokens"])
    sft, _ = L.sft_loss(x["logits"], x["tokens"], mask, reduction="sequence")
    rewards, _ = L.kl_penalty_rewards(x["rewards"], logps, ref, mask, kl_coef=0.05)
    advantages, returns = L.gae(rewards, old, mask, gamma=1.0, lam=0.95)
    policy, _ = L.clipped_policy_loss(logps, old, L.whiten(advantages, mask), mask, clip_eps_low=0.2)
    value, _ = L.clipped_value_loss(logps, old, returns, mask, clip_eps=0.2)
    chosen, rejected = L.masked_sum(logps, mask, axis=-1), L.masked_sum(old, mask, axis=-1)
    ref_chosen = L.masked_sum(ref, mask, axis=-1)
    dpo = L.dpo_loss(chosen, rejected, ref_chosen, rejected - 1.0, beta=0.1, loss_type="bco_pair")
    lengths = jnp.sum(mask, -1)
    return {
        "grpo": grpo(logps),
        "grpo_grad": jax.grad(grpo)(logps),
        "gspo": gspo,
        "token_logps": token_logps,
        "entropy": L.entropy(x["logits"]),
        "sft": sft,
        "gae": advantages,
        "policy": L.masked_mean(policy, mask),
        "value": L.masked_mean(value, mask),
        "dpo": dpo[0],
        "simpo": L.simpo_loss(chosen, rejected, lengths, lengths, beta=2.0, gamma=0.5)[0],
        "orpo": L.orpo_odds_ratio_loss(chosen, rejected, lengths, lengths)[0],
        "bt": L.bradley_terry_loss(chosen, rejected, center_coef=0.01),
        "pl": L.plackett_luce_loss(logps[:, :4], jnp.argsort(old[:, :4], axis=-1), mask[:, :4]),
    }


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_batch_sharded_equals_single_device(axis_type):
    assert jax.device_count() >= 8, "tests/conftest.py should give 8 fake CPU devices"
    x = inputs()
    want = jax.jit(every_family)(x)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        got = jax.jit(every_family)(sharded)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
