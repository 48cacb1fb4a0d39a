"""From next-token logits to a sampled token and its log-probability: pure functions of arrays.

The pipeline for one decode step, ``logits [B, V]`` (any dtype; all math here is float32):

1. ``process_logits``: divide by the temperature, then mask out (set to ``-inf``) tokens removed by
   top-k, top-p (nucleus, Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration") and min-p
   (Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling"), in that order, each filter acting on the
   distribution left by the previous one (the order transformers' logits warpers use).
2. ``sample``: a categorical draw from the processed logits, or the argmax when ``temperature == 0``.
3. ``token_logprob``: ``log_softmax(processed)[token]`` — the log-probability of the sampled token under the
   SAME processed distribution that drew it.

About the log-probabilities (what GRPO/PPO "old log-probs" need): they are under the temperature-scaled and
filtered distribution. When no filter is active this equals what a trainer computes by teacher forcing with
``logits / temperature`` (``jrft.train.logprobs.shifted_token_logps(..., temperature=T)``), so the ratio
``pi / pi_old`` starts at exactly 1. With top-k/top-p/min-p active they do NOT match the trainer's unfiltered
scores: the filtered distribution renormalises over the kept tokens, so its log-probs are higher
(``log p_filtered = log p - log(kept mass)``). Greedy decoding (``temperature == 0``) has a degenerate
distribution; there the returned log-prob is that of the token under the raw, unscaled, unfiltered softmax
(temperature 1), which is what a teacher-forced score of the greedy text gives.

Ties: top-k keeps every token whose logit equals the k-th largest (so more than k when tied at the boundary,
as transformers' ``TopKLogitsWarper`` does); top-p keeps every token whose logit is >= the smallest logit of
the minimal nucleus (ties at the boundary are all kept, so the kept set is never order dependent).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into a token.

    ``temperature == 0`` means greedy. ``top_k`` 0/None, ``top_p`` None/1.0 and ``min_p`` None/0.0 disable the
    respective filter. Which filters are on is static (it changes the compiled program); the values of
    ``temperature``, ``top_p`` and ``min_p`` are passed to jitted code as arrays, so changing them does not
    recompile. ``top_k`` is static (``lax.top_k`` needs a static k).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def use_top_k(self) -> bool:
        return bool(self.top_k)

    @property
    def use_top_p(self) -> bool:
        return self.top_p is not None and self.top_p < 1.0

    @property
    def use_min_p(self) -> bool:
        return self.min_p is not None and self.min_p > 0.0

    def static_key(self) -> tuple:
        """What the compiled program depends on: (greedy, top_k, top-p on, min-p on)."""
        return (self.greedy, int(self.top_k or 0), self.use_top_p, self.use_min_p)

    def dynamic_values(self) -> dict[str, jax.Array]:
        """Float32 scalars fed to jitted code (temperature 1 when greedy, unused filters neutral)."""
        return {
            "temperature": jnp.float32(1.0 if self.greedy else self.temperature),
            "top_p": jnp.float32(self.top_p if self.use_top_p else 1.0),
            "min_p": jnp.float32(self.min_p if self.use_min_p else 0.0),
        }


def _top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """True where a logit is >= the k-th largest of its row. ``logits [B, V]`` -> ``[B, V]`` bool."""
    k = min(k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # [B, 1]
    return logits >= kth


def _top_p_mask(logits: jax.Array, top_p: jax.Array, sorted_desc: jax.Array | None = None) -> jax.Array:
    """True for the minimal nucleus: the largest-probability tokens whose cumulative mass first reaches
    ``top_p`` (always at least the most likely token), plus tokens tied with its smallest member.

    ``sorted_desc [B, M]`` (optional): the row's M largest logits in descending order, when the caller knows
    that all other tokens are already ``-inf`` (after top-k), so the full-vocabulary sort is skipped.
    """
    if sorted_desc is None:
        sorted_desc = -jnp.sort(-logits, axis=-1)  # [B, V], descending
    # normalised over the whole row, so a partial view (top-k, with ties beyond k) still gives true masses
    probs = jnp.exp(sorted_desc - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative sum
    keep_sorted = mass_before < top_p  # prefix; position 0 always kept (mass_before == 0 < p)
    # smallest kept logit: the threshold, applied back to the unsorted row
    threshold = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
    return logits >= threshold


def _min_p_mask(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """True where ``p(token) >= min_p * max p`` — in log space ``logit >= max logit + log(min_p)``."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    return logits >= top + jnp.log(min_p)


def process_logits(
    logits: jax.Array,
    *,
    temperature: jax.Array | float = 1.0,
    top_k: int | None = None,
    top_p: jax.Array | float | None = None,
    min_p: jax.Array | float | None = None,
) -> jax.Array:
    """Temperature, then top-k, top-p and min-p filtering: ``[..., V]`` -> ``[..., V]`` float32.

    Removed tokens get ``-inf``; at least one token (the argmax) always survives. ``temperature`` must be
    > 0 here (greedy is ``sample``'s business). A filter is skipped when its argument is None (top-k also
    when 0); a traced ``top_p == 1`` or ``min_p == 0`` keeps everything.

    Example:
      >>> process_logits(jnp.log(jnp.array([[0.5, 0.3, 0.2]])), top_p=0.6)  # keeps 0.5 and 0.3
    """
    x = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    sorted_desc = None
    if top_k:
        if top_p is not None and top_k < x.shape[-1]:
            sorted_desc = jax.lax.top_k(x, top_k)[0]  # [..., k], descending: reused by top-p
            x = jnp.where(x >= sorted_desc[..., -1:], x, NEG_INF)
        else:
            x = jnp.where(_top_k_mask(x, top_k), x, NEG_INF)
    if top_p is not None:
        x = jnp.where(_top_p_mask(x, jnp.asarray(top_p, jnp.float32), sorted_desc), x, NEG_INF)
    if min_p is not None:
        x = jnp.where(_min_p_mask(x, jnp.asarray(min_p, jnp.float32)), x, NEG_INF)
    return x


def logits_to_probs(logits: jax.Array, **filters) -> jax.Array:
    """``softmax(process_logits(logits, **filters))``: ``[..., V]`` float32 probabilities (zeros for removed
    tokens)."""
    return jax.nn.softmax(process_logits(logits, **filters), axis=-1)


def sample(rng: jax.Array, processed: jax.Array, *, greedy: bool = False) -> jax.Array:
    """One token per row: ``processed [B, V]`` -> ``[B]`` int32. Greedy takes the argmax (first on ties,
    as ``torch.argmax`` does); otherwise a categorical draw (Gumbel-max) from ``softmax(processed)``."""
    if greedy:
        return jnp.argmax(processed, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, processed, axis=-1).astype(jnp.int32)


def token_logprob(processed: jax.Array, tokens: jax.Array) -> jax.Array:
    """``log_softmax(processed)[tokens]``: ``processed [B, V]``, ``tokens [B]`` -> ``[B]`` float32."""
    logp = jax.nn.log_softmax(processed.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]


def select_next(
    rng: jax.Array,
    logits: jax.Array,
    params: SamplingParams,
    values: dict[str, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The whole step: ``logits [B, V]`` -> (tokens ``[B]`` int32, their log-probs ``[B]`` float32).

    ``values`` are ``params.dynamic_values()`` (possibly traced); the static structure comes from ``params``.
    Greedy: argmax of the raw logits, log-prob under the raw softmax (see the module docstring).
    """
    if params.greedy:
        raw = logits.astype(jnp.float32)
        tokens = sample(rng, raw, greedy=True)
        return tokens, token_logprob(raw, tokens)
    v = params.dynamic_values() if values is None else values
    processed = process_logits(
        logits,
        temperature=v["temperature"],
        top_k=params.top_k or None,
        top_p=v["top_p"] if params.use_top_p else None,
        min_p=v["min_p"] if params.use_min_p else None,
    )
    tokens = sample(rng, processed)
    return tokens, token_logprob(processed, tokens)
