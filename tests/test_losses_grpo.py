"""jrft.losses.grpo: group advantages and the GRPO family loss against NumPy references, plus invariances."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jrft.losses as L

RNG = np.random.default_rng(5)
P, G, T = 3, 4, 6
B = P * G


def f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)


def np_group_advantages(rewards, group_size, scale, baseline, eps=1e-4, ddof=0):
    """Per group with Python loops: NaN rewards are missing; stats over the valid ones (population std, or
    the sample std with ddof=1)."""
    rewards = f64(rewards)
    valid_all = rewards[~np.isnan(rewards)]
    out = np.zeros_like(rewards)
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        valid = group[~np.isnan(group)]
        for i, r in enumerate(group):
            if np.isnan(r):
                continue
            if baseline == "group_mean":
                base = valid.mean()
            elif baseline == "rloo":
                base = (valid.sum() - r) / (len(valid) - 1) if len(valid) > 1 else r
            elif baseline == "batch_mean":
                base = valid_all.mean()
            else:
                base = 0.0
            std = {"group": valid.std(ddof=ddof), "batch": valid_all.std(ddof=ddof), "none": None}[scale]
            out[start + i] = (r - base) if std is None else (r - base) / (std + eps)
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_group_advantages_match_numpy(dtype):
    rewards = RNG.normal(size=B) * 2
    rewards[1] = np.nan  # one failed reward
    rewards[4:8] = np.nan  # a whole group failed
    rewards = jnp.asarray(rewards, dtype)
    combos = list(itertools.product(sorted(L.BASELINES), sorted(L.ADVANTAGE_SCALES)))
    every = jax.jit(lambda r: [L.group_advantages(r, G, scale=sc, baseline=bl) for bl, sc in combos])
    for (baseline, scale), got in zip(combos, every(rewards), strict=True):
        want = np_group_advantages(rewards, G, scale, baseline)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{baseline}/{scale}")
        assert bool(jnp.all(got[4:8] == 0)) and float(got[1]) == 0.0


def test_sample_std_matches_numpy_and_trl_factor():
    rewards = RNG.normal(size=B)
    for scale in ("group", "batch"):
        got = L.group_advantages(jnp.asarray(rewards), G, scale=scale, std="sample")
        want = np_group_advantages(rewards, G, scale, "group_mean", ddof=1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Without eps the two stds differ by sqrt(G / (G - 1)) exactly: 1.155 at G = 4.
    pop = L.group_advantages(jnp.asarray(rewards), G, eps=0.0)
    sample = L.group_advantages(jnp.asarray(rewards), G, eps=0.0, std="sample")
    np.testing.assert_allclose(pop / sample, np.sqrt(G / (G - 1)), rtol=1e-5)
    with pytest.raises(ValueError, match=r"unknown std 'n'; valid: population, sample"):
        L.group_advantages(jnp.asarray(rewards), G, std="n")


def test_group_advantages_hand_values():
    rewards = jnp.array([1.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(L.group_advantages(rewards, 2, eps=0.0), [1.0, -1.0, 0.0, 0.0])
    np.testing.assert_allclose(L.group_advantages(rewards, 2, scale="none"), [0.5, -0.5, 0.0, 0.0])
    rloo = L.group_advantages(jnp.array([3.0, 1.0, 2.0]), 3, scale="none", baseline="rloo")
    np.testing.assert_allclose(rloo, [1.5, -1.5, 0.0])
    np.testing.assert_allclose(L.group_advantages(jnp.full(4, jnp.nan), 2), np.zeros(4))


def np_grpo_loss(logps, old, ref, adv, mask, *, el, eh, beta, kl, aggregation, level, max_len, n_tok, n_seq):
    """The GRPO objective spelled out per token in NumPy (DeepSeekMath eq. 3 and its variants; CISPO and
    SAPO from TRL's formulas, which follow their papers)."""
    lp, old, mask = f64(logps), f64(old), np.asarray(mask, np.float64)
    adv = np.broadcast_to(np.asarray(adv, np.float64)[:, None], lp.shape) if np.ndim(adv) == 1 else adv
    log_ratio = lp - old
    if level == "sequence":
        per_seq = (log_ratio * mask).sum(-1) / np.maximum(mask.sum(-1), 1)
        log_ratio = np.broadcast_to(per_seq[:, None], lp.shape)
    ratio = np.exp(log_ratio)
    loss = -np.minimum(ratio * adv, np.clip(ratio, 1 - el, 1 + eh) * adv)
    if aggregation == "cispo":  # MiniMax-M1 eq. 4 with TRL's cap: the weight min(rho, eps_high), detached
        loss = -np.minimum(ratio, eh) * adv * lp
    if aggregation == "sapo":  # arXiv 2511.20347: soft gate, tau 1.0 for A > 0 and 1.05 otherwise
        tau = np.where(adv > 0, 1.0, 1.05)
        loss = -sig(tau * (ratio - 1)) * 4 / tau * adv
    if ref is not None:
        rp = f64(ref)
        kl_t = {"k1": lp - rp, "k2": 0.5 * (lp - rp) ** 2, "k3": np.exp(rp - lp) - 1 - (rp - lp)}[kl]
        loss = loss + beta * kl_t
    loss = loss * mask
    if aggregation in ("grpo", "sapo"):
        rows = mask.sum(-1) > 0
        return (loss.sum(-1)[rows] / mask.sum(-1)[rows]).sum() / n_seq
    if aggregation == "dr_grpo":
        return loss.sum() / (len(mask) * max_len)  # every row counts, an empty one too (Dr. GRPO, TRL)
    return loss.sum() / n_tok


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def make_batch(dtype=jnp.float32):
    logps = jnp.asarray(-RNG.uniform(0.2, 3.0, size=(B, T)), dtype)
    old = jnp.asarray(f64(logps) + RNG.normal(size=(B, T)) * 0.3, dtype)
    ref = jnp.asarray(f64(logps) + RNG.normal(size=(B, T)) * 0.3, dtype)
    adv = L.group_advantages(jnp.asarray(RNG.normal(size=B)), G)
    lengths = RNG.integers(1, T + 1, size=B)
    lengths[5] = 0  # an empty completion
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    return logps, old, ref, adv, jnp.asarray(mask)


AGGREGATIONS = sorted(L.AGGREGATIONS)
# "bnpo" and "dapo" share one normaliser here (see grpo_loss), so the invariance tests run one of them.
DISTINCT_AGGREGATIONS = ["dapo", "dr_grpo", "grpo", "cispo", "sapo"]


def test_bnpo_and_dapo_are_the_same_normaliser():
    assert L.AGGREGATIONS["bnpo"] is L.AGGREGATIONS["dapo"]


# Every aggregation x importance level, then each KL estimator, no KL, and bf16 inputs.
NUMPY_CASES = [
    (agg, level, 0.04, "k3", jnp.float32) for agg in AGGREGATIONS for level in ("token", "sequence")
]
NUMPY_CASES += [("cispo", "token", 0.0, "k3", jnp.float32), ("sapo", "token", 0.0, "k3", jnp.bfloat16)]
NUMPY_CASES += [
    ("grpo", "token", 0.0, "k3", jnp.float32),
    ("dapo", "token", 0.1, "k1", jnp.float32),
    ("dr_grpo", "sequence", 0.1, "k2", jnp.float32),
    ("grpo", "token", 0.04, "k3", jnp.bfloat16),
    ("dapo", "sequence", 0.1, "k2", jnp.bfloat16),
]


@pytest.mark.parametrize(("aggregation", "level", "beta", "kl", "dtype"), NUMPY_CASES)
def test_grpo_loss_matches_numpy(aggregation, level, beta, kl, dtype):
    logps, old, ref, adv, mask = make_batch(dtype)
    eh = 1.3 if aggregation == "cispo" else 0.28  # CISPO's eps_high caps the ratio itself (TRL: eps_max)
    kwargs = dict(clip_eps_low=0.2, clip_eps_high=eh, beta=beta, kl_estimator=kl, aggregation=aggregation)
    fn = jax.jit(lambda *a: L.grpo_loss(*a, importance_level=level, max_completion_length=8, **kwargs))
    loss, metrics = fn(logps, old, ref, adv, mask)
    m = np.asarray(mask)
    n_tok, n_seq = m.sum(), (m.sum(-1) > 0).sum()
    want = np_grpo_loss(
        logps, old, ref, adv, mask, el=0.2, eh=eh, beta=beta, kl=kl, aggregation=aggregation, level=level,
        max_len=8, n_tok=n_tok, n_seq=n_seq,
    )  # fmt: skip
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    assert float(metrics["num_tokens"]) == n_tok


def test_grpo_metrics():
    logps = jnp.log(jnp.array([[1.5, 0.5, 1.0, 0.5]]))  # old log-probs 0: ratios 1.5, 0.5, 1, (masked)
    ref = jnp.log(jnp.array([[1.5, 0.5, 0.5, 0.5]]))
    adv = jnp.array([[1.0, -1.0, 1.0, 1.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    loss, metrics = L.grpo_loss(
        logps, jnp.zeros((1, 4)), ref, adv, mask, clip_eps_low=0.2, clip_eps_high=0.3, beta=0.1
    )
    np.testing.assert_allclose(metrics["clip_frac_high"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac_low"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac"], 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio_mean"], 1.0, rtol=1e-6)
    kl = 0.5 - 1 - np.log(0.5)  # only token 3 differs from the reference
    np.testing.assert_allclose(metrics["kl_mean"], kl / 3, rtol=1e-5)
    # -min(1.5, 1.3) * 1, -min(-0.5, -0.8), -1, then the KL term; mean over the 3 tokens.
    np.testing.assert_allclose(loss, (-1.3 + 0.8 - 1.0 + 0.1 * kl) / 3, rtol=1e-5)


@pytest.mark.parametrize(
    ("aggregation", "level"),
    [
        ("grpo", "token"),
        ("grpo", "sequence"),
        ("dapo", "token"),
        ("dr_grpo", "sequence"),
        ("cispo", "token"),
        ("sapo", "token"),
    ],
)
def test_micro_batches_with_global_counts_equal_full_batch(aggregation, level):
    logps, old, ref, adv, mask = make_batch()
    num_tokens, num_sequences = L.batch_counts(mask)
    kwargs = dict(clip_eps_low=0.2, beta=0.04, aggregation=aggregation, importance_level=level)

    def micro(lp, rows, **counts):
        return L.grpo_loss(lp[rows], old[rows], ref[rows], adv[rows], mask[rows], **counts, **kwargs)[0]

    def full(lp):
        return L.grpo_loss(lp, old, ref, adv, mask, **kwargs)[0]

    def accumulated(lp):  # uneven micro-batches, one holding the empty row
        counts = dict(num_tokens=num_tokens, num_sequences=num_sequences, num_rows=B, max_completion_length=T)
        return sum(micro(lp, rows, **counts) for rows in (slice(0, 5), slice(5, 7), slice(7, B)))

    @jax.jit
    def run(lp):
        # Without the global counts each micro-batch normalises by its own: not the full-batch loss.
        local = micro(lp, slice(0, 5)) + micro(lp, slice(5, B))
        return jax.value_and_grad(full)(lp), jax.value_and_grad(accumulated)(lp), local

    (full_loss, full_grad), (acc_loss, acc_grad), local = run(logps)
    np.testing.assert_allclose(acc_loss, full_loss, rtol=1e-5)
    np.testing.assert_allclose(acc_grad, full_grad, rtol=1e-5, atol=1e-8)
    assert not np.isclose(float(local), float(full_loss), rtol=1e-2, atol=0)


def test_gspo_equals_token_grpo_when_ratios_are_one():
    logps, _, ref, adv, mask = make_batch()
    for old in (None, logps):

        @jax.jit
        def value_and_grads(lp, old=old):
            out = {}
            for level in ("token", "sequence", "sequence_token"):
                kwargs = dict(clip_eps_low=0.2, beta=0.04, importance_level=level)
                out[level] = jax.value_and_grad(
                    lambda x, kw=kwargs: L.grpo_loss(x, old, ref, adv, mask, **kw)[0]
                )(lp)
            return out

        results = value_and_grads(logps)
        for level in ("sequence", "sequence_token"):
            np.testing.assert_allclose(results[level][0], results["token"][0], rtol=1e-6)
            np.testing.assert_allclose(results[level][1], results["token"][1], rtol=1e-5, atol=1e-8)


def test_gspo_token_variant_matches_sequence_variant_off_policy():
    logps, old, ref, adv, mask = make_batch()

    @jax.jit
    def value_and_grads(lp):
        def loss(x, level):
            return L.grpo_loss(x, old, ref, adv, mask, clip_eps_low=0.2, beta=0.0, importance_level=level)[0]

        return [jax.value_and_grad(loss)(lp, level) for level in ("sequence_token", "sequence")]

    (token_loss, token_grad), (seq_loss, seq_grad) = value_and_grads(logps)
    np.testing.assert_allclose(token_loss, seq_loss, rtol=1e-6)
    np.testing.assert_allclose(token_grad, seq_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", DISTINCT_AGGREGATIONS)
def test_masking_equals_dropping(aggregation, level):
    logps, old, ref, adv, mask = make_batch()
    kwargs = dict(clip_eps_low=0.2, beta=0.04, aggregation=aggregation, importance_level=level)
    kwargs["max_completion_length"] = T
    loss = jax.jit(lambda *a: L.grpo_loss(*a, **kwargs)[0])
    # A fully masked row is the same as a row left out; for dr_grpo it still counts in the constant
    # normaliser num_rows * max_completion_length (Dr. GRPO's point: a constant), hence (B - 1) / B.
    masked = mask.at[2].set(0)
    rows = np.array([i for i in range(B) if i != 2])
    factor = (B - 1) / B if aggregation == "dr_grpo" else 1.0
    np.testing.assert_allclose(
        loss(logps, old, ref, adv, masked),
        factor * loss(logps[rows], old[rows], ref[rows], adv[rows], mask[rows]),
        rtol=1e-6,
    )
    # Masked trailing positions are the same as a shorter sequence (garbage there is never read).
    short = mask.at[:, 4:].set(0)
    garbage = logps.at[:, 4:].set(1e4)
    np.testing.assert_allclose(
        loss(garbage, old, ref, adv, short),
        loss(logps[:, :4], old[:, :4], ref[:, :4], adv, short[:, :4]),
        rtol=1e-6,
    )


@pytest.mark.parametrize("aggregation", DISTINCT_AGGREGATIONS)
def test_all_masked_gives_zero_loss_and_finite_grads(aggregation):
    logps, old, ref, adv, mask = make_batch()
    zeros = jnp.zeros_like(mask)
    garbage = jnp.full_like(old, -1e4)

    kwargs = dict(clip_eps_low=0.2, beta=0.1, aggregation=aggregation)

    @jax.jit
    def run(lp):
        masked = jax.value_and_grad(
            lambda x: L.grpo_loss(x, garbage, garbage, adv, zeros, **kwargs), has_aux=True
        )
        # One empty row (row 5) among full ones.
        one_empty = jax.grad(lambda x: L.grpo_loss(x, old, ref, adv, mask, **kwargs)[0])
        return masked(lp), one_empty(lp)

    ((value, metrics), grads), one_empty_grads = run(logps)
    assert float(value) == 0.0 and all(bool(jnp.isfinite(v)) for v in metrics.values())
    assert bool(jnp.all(grads == 0))
    assert bool(jnp.all(jnp.isfinite(one_empty_grads))) and bool(jnp.all(one_empty_grads[5] == 0))


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        logps = jnp.asarray(-RNG.uniform(0.5, 3.0, size=(4, 3)))
        old = logps + jnp.asarray(RNG.uniform(-0.1, 0.1, size=(4, 3)))  # inside the trust region
        ref = logps + jnp.asarray(RNG.normal(size=(4, 3)) * 0.3)
        adv = jnp.asarray(RNG.normal(size=4))
        mask = jnp.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
        cases = [("grpo", "token"), ("dapo", "token"), ("dr_grpo", "sequence"), ("sapo", "token")]
        for aggregation, level in cases:

            def loss(lp, aggregation=aggregation, level=level):
                return L.grpo_loss(
                    lp, old, ref, adv, mask, clip_eps_low=0.2, beta=0.05, aggregation=aggregation,
                    importance_level=level,
                )[0]  # fmt: skip

            check_grads(jax.jit(loss), (logps,), 1, ["rev"], eps=1e-6)


def test_errors_name_the_problem():
    logps, old, ref, adv, mask = make_batch()
    kwargs = dict(clip_eps_low=0.2, beta=0.0)
    with pytest.raises(
        ValueError, match=r"unknown GRPO aggregation 'mean'; valid: bnpo, cispo, dapo, dr_grpo, grpo, sapo"
    ):
        L.grpo_loss(logps, old, ref, adv, mask, aggregation="mean", **kwargs)
    with pytest.raises(
        ValueError, match=r"unknown importance_level 'seq'; valid: sequence, sequence_token, token"
    ):
        L.grpo_loss(logps, old, ref, adv, mask, importance_level="seq", **kwargs)
    with pytest.raises(ValueError, match=r"unknown KL estimator 'kl'"):
        L.grpo_loss(logps, old, ref, adv, mask, kl_estimator="kl", **kwargs)
    with pytest.raises(ValueError, match=r"grpo_loss: beta=0.04 needs ref_logps"):
        L.grpo_loss(logps, old, None, adv, mask, clip_eps_low=0.2, beta=0.04)
    with pytest.raises(ValueError, match=r"grpo_loss: .*logps\[12, 6\], old_logps\[12, 5\]"):
        L.grpo_loss(logps, old[:, :5], ref, adv, mask, **kwargs)
    with pytest.raises(ValueError, match=r"grpo_loss: advantages must be \[batch\] or \[batch, seq\]"):
        L.grpo_loss(logps, old, ref, adv[:3], mask, **kwargs)
    with pytest.raises(ValueError, match=r"unknown advantage scale 'std'; valid: batch, group, none"):
        L.group_advantages(adv, G, scale="std")
    with pytest.raises(
        ValueError, match=r"unknown advantage baseline 'mean'; valid: batch_mean, group_mean, none"
    ):
        L.group_advantages(adv, G, baseline="mean")
    with pytest.raises(ValueError, match=r"rewards length 12 is not a multiple of group_size 5"):
        L.group_advantages(adv, 5)
    with pytest.raises(ValueError, match=r"group_advantages: rewards must be \[num_prompts \* group_size\]"):
        L.group_advantages(jnp.zeros((3, 4)), 4)


def test_cispo_gradient_is_the_detached_weight_times_advantage():
    """CISPO keeps every token's REINFORCE gradient, scaled by the clipped, detached weight: d loss /
    d logp_t = -min(rho_t, eps_max) A / num_tokens, even where PPO's clip would zero it."""
    logps = jnp.log(jnp.array([[2.0, 0.5, 1.0]]))  # old log-probs 0: ratios 2, 0.5, 1
    adv = jnp.array([1.0])
    grad = jax.grad(
        lambda lp: L.grpo_loss(lp, jnp.zeros((1, 3)), None, adv, None, clip_eps_low=0.2, clip_eps_high=1.5,
                               beta=0.0, aggregation="cispo")[0]
    )(logps)  # fmt: skip
    np.testing.assert_allclose(grad, [[-1.5 / 3, -0.5 / 3, -1.0 / 3]], rtol=1e-6)


def test_sapo_gradient_at_ratio_one_equals_the_unclipped_one():
    logps, _, _, adv, mask = make_batch()
    kwargs = dict(clip_eps_low=0.2, beta=0.0)
    sapo = jax.grad(lambda lp: L.grpo_loss(lp, None, None, adv, mask, aggregation="sapo", **kwargs)[0])(logps)
    grpo = jax.grad(lambda lp: L.grpo_loss(lp, None, None, adv, mask, aggregation="grpo", **kwargs)[0])(logps)
    np.testing.assert_allclose(sapo, grpo, rtol=1e-5, atol=1e-7)
