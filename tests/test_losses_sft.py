"""jrft.losses.sft: masked cross-entropy against a NumPy reference, reductions, micro-batch invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jrft.losses as L

RNG = np.random.default_rng(1)
B, T, V = 4, 6, 13


def f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)


def np_nll(logits, targets):
    z = f64(logits)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]


def np_sft(logits, targets, mask, reduction):
    nll = np_nll(logits, targets) * mask
    if reduction == "token":
        return nll.sum() / mask.sum()
    rows = mask.sum(-1) > 0
    return (nll.sum(-1)[rows] / mask.sum(-1)[rows]).mean()


def batch(dtype=jnp.float32):
    logits = jnp.asarray(RNG.normal(size=(B, T, V)) * 2, dtype)
    targets = jnp.asarray(RNG.integers(0, V, size=(B, T)))
    lengths = np.array([6, 4, 1, 3])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    return logits, targets, jnp.asarray(mask)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_sft_loss_matches_numpy(reduction, dtype):
    logits, targets, mask = batch(dtype)
    loss_fn = jax.jit(lambda *a: L.sft_loss(*a, reduction=reduction))
    loss, metrics = loss_fn(logits, targets, mask)
    np.testing.assert_allclose(loss, np_sft(logits, targets, np.asarray(mask), reduction), rtol=1e-5)
    np.testing.assert_allclose(metrics["nll"], np_sft(logits, targets, np.asarray(mask), "token"), rtol=1e-5)
    assert float(metrics["num_tokens"]) == 14
    per_token = L.token_cross_entropy(logits, targets, mask)
    np.testing.assert_allclose(per_token, np_nll(logits, targets) * np.asarray(mask), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        L.sequence_nll(logits, targets, mask), (np_nll(logits, targets) * np.asarray(mask)).sum(-1), rtol=1e-5
    )


def test_sft_hand_values():
    logits = jnp.log(jnp.array([[[1.0, 1.0], [1.0, 3.0]], [[3.0, 1.0], [1.0, 1.0]]]))  # [2, 2, 2]
    targets = jnp.array([[0, 1], [0, 1]])
    mask = jnp.array([[1, 1], [1, 0]])
    # token nlls: row 0: log 2, -log .75; row 1: -log .75 (second masked)
    token = (np.log(2) - 2 * np.log(0.75)) / 3
    sequence = ((np.log(2) - np.log(0.75)) / 2 - np.log(0.75)) / 2
    np.testing.assert_allclose(L.sft_loss(logits, targets, mask)[0], token, rtol=1e-6)
    got = L.sft_loss(logits, targets, mask, reduction="sequence")[0]
    np.testing.assert_allclose(got, sequence, rtol=1e-6)
    # argmax: row 0 pos 0 is a tie (argmax 0 = target), pos 1 -> 1 = target, row 1 pos 0 -> 0 = target.
    assert float(L.sft_loss(logits, targets, mask)[1]["accuracy"]) == 1.0


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_micro_batches_with_global_counts_equal_full_batch(reduction):
    logits, targets, mask = batch()
    num_tokens, num_sequences = L.batch_counts(mask)

    def full(z):
        return L.sft_loss(z, targets, mask, reduction=reduction)[0]

    def split(z):
        total = 0.0
        for rows in (slice(0, 1), slice(1, 4)):
            total += L.sft_loss(
                z[rows],
                targets[rows],
                mask[rows],
                reduction=reduction,
                num_tokens=num_tokens,
                num_sequences=num_sequences,
            )[0]
        return total

    full, split = jax.jit(full), jax.jit(split)
    np.testing.assert_allclose(split(logits), full(logits), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(split)(logits), jax.grad(full)(logits), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_masking_equals_dropping(reduction):
    logits, targets, mask = batch()
    loss = jax.jit(lambda *a: L.sft_loss(*a, reduction=reduction)[0])
    masked_row = mask.at[1].set(0)
    dropped = np.array([0, 2, 3])
    np.testing.assert_allclose(
        loss(logits, targets, masked_row), loss(logits[dropped], targets[dropped], mask[dropped]), rtol=1e-6
    )
    # Masking row 0's last two tokens equals cutting every row to 4 positions (the others have at most 4).
    short = mask.at[0, 4:].set(0)
    np.testing.assert_allclose(
        loss(logits, targets, short), loss(logits[:, :4], targets[:, :4], short[:, :4]), rtol=1e-6
    )


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_all_masked_gives_zero_loss_and_finite_grads(reduction):
    logits, targets, mask = batch()
    zeros = jnp.zeros_like(mask)
    loss_fn = jax.jit(lambda z: L.sft_loss(z, targets, zeros, reduction=reduction)[0])
    assert float(loss_fn(logits)) == 0.0
    grads = jax.grad(loss_fn)(logits)
    assert bool(jnp.all(grads == 0))


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        logits = jnp.asarray(RNG.normal(size=(2, 3, 5)))
        targets = jnp.asarray(RNG.integers(0, 5, size=(2, 3)))
        mask = jnp.array([[1, 1, 0], [1, 0, 0]])
        for reduction in ("token", "sequence"):
            loss_fn = lambda z, r=reduction: L.sft_loss(z, targets, mask, reduction=r)[0]
            check_grads(jax.jit(loss_fn), (logits,), 1, ["rev"])


def test_errors_name_the_problem():
    logits, targets, mask = batch()
    with pytest.raises(ValueError, match=r"unknown SFT reduction 'mean'; valid: sequence, token"):
        L.sft_loss(logits, targets, mask, reduction="mean")
    with pytest.raises(ValueError, match=r"sft_loss: .*targets\[4, 6\], mask\[4, 5\]"):
        L.sft_loss(logits, targets, mask[:, :5])
    with pytest.raises(ValueError, match=r"sft_loss: logits must be \[batch, seq, vocab\]"):
        L.sft_loss(logits[0], targets, mask)


def test_ignored_targets_at_masked_positions_are_never_read():
    logits, targets, mask = batch()
    ignored = jnp.where(mask > 0, targets, -100)  # the Hugging Face "ignore" id at masked positions
    loss_fn = lambda z, t: L.sft_loss(z, t, mask)[0]
    np.testing.assert_allclose(loss_fn(logits, ignored), loss_fn(logits, targets), rtol=1e-6)
    assert bool(jnp.all(jnp.isfinite(jax.grad(loss_fn)(logits, ignored))))
