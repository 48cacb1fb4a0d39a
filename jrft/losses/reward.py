"""Reward-model losses: pairwise Bradley–Terry, rankings to pairs, listwise Plackett–Luce.

Shapes: ``B`` pairs or rankings, ``K`` items per ranking. Scores are the reward model's scalar outputs.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jrft.losses._checks import as_float, as_mask, check_rank, check_same_shape


def bradley_terry_loss(chosen_rewards, rejected_rewards, *, margin=None, center_coef: float = 0.0):
    """Pairwise Bradley–Terry loss, one value per pair.

    ``loss_i = -log sigmoid(r_c_i - r_r_i - margin_i) + center_coef * (r_c_i + r_r_i)**2`` with ``r_c`` the
    chosen and ``r_r`` the rejected rewards.

    The margin is Llama 2's per-pair preference margin (Touvron et al. 2023, arXiv 2307.09288, eq. 2); the
    centring term keeps rewards near zero (Eisenstein et al. 2023, arXiv 2312.09244). Bradley & Terry
    (1952); used for RLHF reward models by Ouyang et al. 2022 (arXiv 2203.02155).

    Args:
      chosen_rewards: ``[B]`` scores of the preferred responses.
      rejected_rewards: ``[B]`` scores of the other responses.
      margin: ``[B]`` or scalar margin, or None for 0.
      center_coef: weight of the reward-centring penalty.

    Returns:
      ``[B]`` float32 losses.
    """
    check_same_shape("bradley_terry_loss", chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    chosen, rejected = as_float(chosen_rewards), as_float(rejected_rewards)
    diff = chosen - rejected
    if margin is not None:
        margin = as_float(margin)
        if margin.ndim != 0:
            check_same_shape("bradley_terry_loss", chosen_rewards=chosen, margin=margin)
        diff = diff - margin
    return -jax.nn.log_sigmoid(diff) + center_coef * jnp.square(chosen + rejected)


def ranking_pairs(ranking):
    """All ordered pairs of a full ranking, as (better, worse) item indices.

    A ranking ``[C, D, A, B]`` (best first) gives ``(C, D), (C, A), (C, B), (D, A), (D, B), (A, B)``:
    ``K * (K - 1) / 2`` pairs, in that order, for the Bradley–Terry loss (as in InstructGPT, arXiv
    2203.02155, which trains on all pairs of each ranked prompt).

    Args:
      ranking: ``[..., K]`` item indices (or any per-item values), best first.

    Returns:
      ``(chosen, rejected)``, each ``[..., K * (K - 1) / 2]``.
    """
    ranking = jnp.asarray(ranking)
    if ranking.ndim < 1:
        raise ValueError(
            f"ranking_pairs: ranking must be [..., K], got a scalar of shape {list(ranking.shape)}"
        )
    first, second = np.triu_indices(ranking.shape[-1], k=1)
    return ranking[..., first], ranking[..., second]


def plackett_luce_loss(scores, ranking, mask=None):
    """Listwise Plackett–Luce negative log-likelihood of a ranking, one value per ranking.

    With ``s_k`` the score of the item ranked k-th (best first) among the ``n`` ranked items:
    ``loss = -sum_{k=1}^{n} [s_k - log sum_{j >= k} exp(s_j)]``. For ``K = 2`` it equals the Bradley–Terry
    loss. Plackett (1975), Luce (1959); used for reward models in Zhu et al. 2023 (arXiv 2301.11270).

    Args:
      scores: ``[B, K]`` scores of the K candidate items of each example.
      ranking: ``[B, K]`` integer item indices into ``scores``, best first.
      mask: ``[B, K]`` 0/1 over ranking positions (1 = this position holds a ranked item), or None. Masked
        positions are left out, as if the ranking were shorter.

    Returns:
      ``[B]`` float32 losses (0 for a ranking with fewer than two items).
    """
    check_rank("plackett_luce_loss", "scores", scores, 2, "[batch, items]")
    check_same_shape("plackett_luce_loss", scores=scores, ranking=ranking, mask=mask)
    scores = as_float(scores)
    keep = as_mask(mask, scores)
    ordered = jnp.take_along_axis(scores, jnp.asarray(ranking).astype(jnp.int32), axis=-1)  # [B, K]
    num_items = scores.shape[-1]
    later = np.triu(np.ones((num_items, num_items), dtype=bool))  # later[k, j]: j >= k
    include = later[None] & keep[:, None, :]  # [B, K(k), K(j)]
    # A large finite floor instead of -inf keeps the log-sum-exp and its gradient finite when a row is empty.
    floor = jnp.asarray(-1e30, ordered.dtype)
    tail = jax.nn.logsumexp(jnp.where(include, ordered[:, None, :], floor), axis=-1)  # [B, K]
    terms = jnp.where(keep, ordered - tail, 0.0)
    return -jnp.sum(terms, axis=-1)
