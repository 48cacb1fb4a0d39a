"""jrft.losses.reward: Bradley–Terry, ranking pairs and Plackett–Luce against NumPy references."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jrft.losses as L

RNG = np.random.default_rng(2)


def f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_bradley_terry(chosen, rejected, margin, center_coef):
    chosen, rejected = f64(chosen), f64(rejected)
    return -np_log_sigmoid(chosen - rejected - margin) + center_coef * (chosen + rejected) ** 2


def np_plackett_luce(scores, ranking, mask):
    """From the formula: per ranked position, minus the log of its softmax over the items left."""
    out = []
    for s, order, keep in zip(f64(scores), np.asarray(ranking), np.asarray(mask), strict=True):
        items = [s[i] for i, k in zip(order, keep, strict=True) if k]
        out.append(-sum(items[k] - np.log(np.sum(np.exp(items[k:]))) for k in range(len(items))))
    return np.array(out)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_bradley_terry_matches_numpy(dtype):
    chosen = jnp.asarray(RNG.normal(size=8) * 2, dtype)
    rejected = jnp.asarray(RNG.normal(size=8) * 2, dtype)
    margin = RNG.uniform(0, 1, size=8)
    loss_fn = jax.jit(lambda c, r, m: L.bradley_terry_loss(c, r, margin=m, center_coef=0.01))
    got = loss_fn(chosen, rejected, margin)
    want = np_bradley_terry(chosen, rejected, f64(margin), 0.01)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        L.bradley_terry_loss(chosen, rejected), np_bradley_terry(chosen, rejected, 0.0, 0.0), rtol=1e-5
    )


def test_bradley_terry_hand_values():
    one = jnp.array([1.0])
    np.testing.assert_allclose(L.bradley_terry_loss(one, one), [np.log(2)], rtol=1e-6)
    np.testing.assert_allclose(
        L.bradley_terry_loss(jnp.array([2.0]), jnp.array([1.0]), margin=1.0), [np.log(2)], rtol=1e-6
    )
    got = L.bradley_terry_loss(jnp.array([1.0]), jnp.array([1.0]), center_coef=0.5)
    np.testing.assert_allclose(got, [np.log(2) + 0.5 * 4.0], rtol=1e-6)


def test_ranking_pairs_of_c_d_a_b():
    a, b, c, d = 0, 1, 2, 3
    chosen, rejected = L.ranking_pairs(jnp.array([c, d, a, b]))
    assert list(zip(chosen.tolist(), rejected.tolist(), strict=True)) == [
        (c, d),
        (c, a),
        (c, b),
        (d, a),
        (d, b),
        (a, b),
    ]
    chosen, rejected = jax.jit(L.ranking_pairs)(jnp.arange(10).reshape(2, 5))
    assert chosen.shape == (2, 10) and bool(jnp.all(chosen < rejected))
    pairs = set(zip(chosen[1].tolist(), rejected[1].tolist(), strict=True))
    assert pairs == set(itertools.combinations(range(5, 10), 2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_plackett_luce_matches_numpy(dtype):
    scores = jnp.asarray(RNG.normal(size=(5, 4)) * 2, dtype)
    ranking = np.stack([RNG.permutation(4) for _ in range(5)])
    mask = np.ones((5, 4), np.int32)
    mask[1, 3:] = 0
    mask[2, 2:] = 0
    mask[3, :] = 0
    got = jax.jit(L.plackett_luce_loss)(scores, ranking, mask)
    np.testing.assert_allclose(got, np_plackett_luce(scores, ranking, mask), rtol=1e-5, atol=1e-6)
    full = np.ones_like(mask)
    np.testing.assert_allclose(
        L.plackett_luce_loss(scores, ranking), np_plackett_luce(scores, ranking, full), rtol=1e-5, atol=1e-6
    )


def test_plackett_luce_hand_value_and_bradley_terry_case():
    # Scores 0, log 2, log 3 ranked best-first as item 2, 1, 0: probability 3/6 * 2/3 = 1/3.
    got = L.plackett_luce_loss(jnp.log(jnp.array([[1.0, 2.0, 3.0]])), jnp.array([[2, 1, 0]]))
    np.testing.assert_allclose(got, [np.log(3)], rtol=1e-6)
    # Two items: Plackett–Luce is Bradley–Terry.
    chosen, rejected = jnp.asarray(RNG.normal(size=6)), jnp.asarray(RNG.normal(size=6))
    pl = L.plackett_luce_loss(jnp.stack([rejected, chosen], -1), jnp.tile(jnp.array([1, 0]), (6, 1)))
    np.testing.assert_allclose(pl, L.bradley_terry_loss(chosen, rejected), rtol=1e-5)


def test_plackett_luce_masking_equals_a_shorter_ranking():
    scores = jnp.asarray(RNG.normal(size=(1, 5)))
    ranking = jnp.array([[3, 0, 4, 1, 2]])
    masked = L.plackett_luce_loss(scores, ranking, jnp.array([[1, 1, 1, 0, 0]]))
    shorter = L.plackett_luce_loss(scores[:, jnp.array([3, 0, 4])], jnp.array([[0, 1, 2]]))
    np.testing.assert_allclose(masked, shorter, rtol=1e-6)


def test_fully_masked_rankings_are_zero_with_finite_grads():
    scores = jnp.asarray(RNG.normal(size=(2, 3)))
    loss_fn = lambda s: jnp.sum(L.plackett_luce_loss(s, jnp.array([[0, 1, 2]] * 2), jnp.zeros((2, 3))))
    assert float(loss_fn(scores)) == 0.0
    grads = jax.grad(loss_fn)(scores)
    assert bool(jnp.all(grads == 0))


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        c, r = jnp.asarray(RNG.normal(size=4)), jnp.asarray(RNG.normal(size=4))
        margin = jnp.asarray(RNG.uniform(size=4))
        bt = lambda a, b: L.bradley_terry_loss(a, b, margin=margin, center_coef=0.1)
        check_grads(bt, (c, r), 1, ["rev"])
        scores = jnp.asarray(RNG.normal(size=(3, 4)))
        ranking = jnp.asarray(np.stack([RNG.permutation(4) for _ in range(3)]))
        mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
        check_grads(lambda s: L.plackett_luce_loss(s, ranking, mask), (scores,), 1, ["rev"])


def test_shape_mismatches_raise_clear_errors():
    with pytest.raises(ValueError, match=r"bradley_terry_loss: .*chosen_rewards\[3\], rejected_rewards\[4\]"):
        L.bradley_terry_loss(jnp.zeros(3), jnp.zeros(4))
    with pytest.raises(ValueError, match=r"bradley_terry_loss: .*margin\[2\]"):
        L.bradley_terry_loss(jnp.zeros(3), jnp.zeros(3), margin=jnp.zeros(2))
    with pytest.raises(ValueError, match=r"plackett_luce_loss: .*scores\[2, 3\], ranking\[2, 4\]"):
        L.plackett_luce_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"plackett_luce_loss: scores must be \[batch, items\]"):
        L.plackett_luce_loss(jnp.zeros(3), jnp.zeros(3, jnp.int32))
