"""Supervised fine-tuning: masked next-token cross-entropy with per-token and per-sequence reductions.

Shapes: ``B`` batch, ``T`` sequence length, ``V`` vocabulary. The caller shifts (logits at position t
predict ``targets[:, t]``) and masks prompt and padding tokens out.
"""

import jax.numpy as jnp

from jrft.losses._checks import as_float, as_mask, check_rank, check_same_shape, lookup
from jrft.losses.common import batch_counts, masked_mean, masked_sum, token_logprobs


def token_cross_entropy(logits, targets, mask=None) -> jnp.ndarray:
    """Per-token negative log-likelihood ``-log softmax(logits[b, t])[targets[b, t]]``, 0 where masked.

    Args:
      logits: ``[B, T, V]``, any float dtype (math in float32).
      targets: ``[B, T]`` integer token ids.
      mask: ``[B, T]`` 0/1, or None for all tokens.

    Returns:
      ``[B, T]`` float32 losses.
    """
    nll = -token_logprobs(logits, targets)
    check_same_shape("token_cross_entropy", targets=targets, mask=mask)
    return jnp.where(as_mask(mask, nll), nll, 0.0)


def _token_reduction(nll, mask, *, num_tokens, num_sequences):
    """Mean over every unmasked token of the batch: ``sum(nll) / num_tokens``."""
    return jnp.sum(nll) / jnp.maximum(as_float(num_tokens), 1.0)


def _sequence_reduction(nll, mask, *, num_tokens, num_sequences):
    """Mean over sequences of each sequence's mean token loss: ``sum_i mean_t nll[i] / num_sequences``."""
    per_sequence = masked_mean(nll, mask, axis=-1)
    return jnp.sum(per_sequence) / jnp.maximum(as_float(num_sequences), 1.0)


SFT_REDUCTIONS = {"token": _token_reduction, "sequence": _sequence_reduction}


def sft_loss(logits, targets, mask, *, reduction: str = "token", num_tokens=None, num_sequences=None):
    """Masked cross-entropy for SFT, reduced per token or per sequence.

    ``token``: ``sum_{i,t} m_it * nll_it / N_tokens``; ``sequence``: ``sum_i (sum_t m_it nll_it / |y_i|) /
    N_sequences``. For gradient accumulation over micro-batches pass the *global* ``num_tokens`` (all
    unmasked tokens of the full batch) or ``num_sequences`` (rows with at least one unmasked token): the
    micro-batch losses then sum to the full-batch loss. Defaults are this call's own counts.

    Args:
      logits: ``[B, T, V]``.
      targets: ``[B, T]`` integer ids.
      mask: ``[B, T]`` 0/1 loss mask.
      reduction: a key of :data:`SFT_REDUCTIONS` ("token" or "sequence").
      num_tokens: normaliser for "token"; defaults to ``sum(mask)``.
      num_sequences: normaliser for "sequence"; defaults to the rows of ``mask`` with any 1.

    Returns:
      ``(loss, metrics)``: scalar float32 loss; metrics ``nll`` (mean per token, this call), ``accuracy``
      (argmax equals target, over unmasked tokens) and ``num_tokens`` (this call's count).
    """
    reduce = lookup(SFT_REDUCTIONS, reduction, "SFT reduction")
    check_rank("sft_loss", "logits", logits, 3, "[batch, seq, vocab]")
    check_same_shape("sft_loss", targets=targets, mask=mask)
    keep = as_mask(mask, targets)
    nll = token_cross_entropy(logits, targets, keep)
    local_tokens, local_sequences = batch_counts(keep)
    num_tokens = local_tokens if num_tokens is None else num_tokens
    num_sequences = local_sequences if num_sequences is None else num_sequences
    loss = reduce(nll, keep, num_tokens=num_tokens, num_sequences=num_sequences)
    correct = (jnp.argmax(logits, axis=-1) == jnp.asarray(targets)).astype(jnp.float32)
    metrics = {
        "nll": masked_mean(nll, keep),
        "accuracy": masked_mean(correct, keep),
        "num_tokens": local_tokens,
    }
    return loss, metrics


def sequence_nll(logits, targets, mask) -> jnp.ndarray:
    """Summed negative log-likelihood of each sequence, ``[B]``: ``-sum_t m_it log p(targets_it)``."""
    return masked_sum(token_cross_entropy(logits, targets, mask), mask, axis=-1)
