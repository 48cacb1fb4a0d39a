"""Log-probabilities of given tokens under a causal LM: the quantity SFT, DPO, PPO and GRPO all start from.

Position ``t`` of the model's logits predicts token ``t + 1``, so results are aligned with the *targets*
``tokens[:, 1:]``: ``[B, T - 1]``. Always float32, whatever the compute dtype.

Memory lever (``train.logits_chunk_size``): for a large vocabulary the float32 logits ``[B, T, V]`` are the
biggest activation of a step (Llama 3: V = 128256, ~31x the hidden size). With ``chunk_size > 0`` the LM head,
log-softmax and gather run over sequence chunks of ``chunk_size`` positions (:func:`chunked_token_logps`): a
``jax.lax.map`` over chunks whose body is ``jax.checkpoint``-ed, so neither the forward nor the backward ever
holds more than one chunk's ``[B, chunk, V]`` logits (the backward recomputes them). The result is the same
(to float rounding) as the unchunked path; the cost is one extra LM-head matmul in the backward.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jrft.losses import token_logprobs
from jrft.train.packing import segment_sum
from jrft.train.reference import frozen_forward


def _head_logps(model, hidden, targets, temperature: float):
    """LM head + log-softmax + gather: ``hidden [B, C, D]`` -> ``([B, C] logps, [B, C] correct)``."""
    logits = model.logits_from_hidden(hidden).astype(jnp.float32)  # [B, C, V]
    if temperature != 1.0:
        logits = logits / temperature
    correct = jnp.argmax(logits, axis=-1) == targets  # [B, C] (no gradient: argmax)
    return token_logprobs(logits, targets), correct


def chunked_token_logps(
    model,
    hidden: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int,
    temperature: float = 1.0,
    with_correct: bool = False,
):
    """``log softmax(head(hidden[:, t]) / temperature)[targets[:, t]]``, ``chunk_size`` positions at a time.

    The model's own ``logits_from_hidden`` is the head (tied or untied embeddings, Gemma 2 final-logit
    soft-capping), so values equal the unchunked path. Each chunk's body is under ``jax.checkpoint``: the
    backward keeps only the chunk's hidden states and recomputes its logits. The sequence axis is chunked
    (not ``B*T`` rows) so a chunk stays sharded over the batch axes like the full activation.

    Args:
      model: a ``jrft.models.Decoder`` (anything with ``logits_from_hidden([B, C, D]) -> [B, C, V]``).
      hidden: ``[B, T, D]`` final hidden states (after the final norm); position ``t`` predicts
        ``targets[:, t]`` (shift before calling).
      targets: ``[B, T]`` int token ids.
      chunk_size: positions per chunk (> 0); need not divide ``T`` (the last chunk is zero-padded and the
        padding dropped).
      temperature: divides the (soft-capped) logits.
      with_correct: also return ``argmax == target`` per position (SFT's accuracy metric).

    Returns:
      ``[B, T]`` float32 log-probs, and ``[B, T]`` bool ``correct`` when ``with_correct``.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunked_token_logps: chunk_size must be positive, got {chunk_size}")
    b, t, d = hidden.shape
    c = min(chunk_size, t)
    n = -(-t // c)  # chunks
    pad = n * c - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = hidden.reshape(b, n, c, d).transpose(1, 0, 2, 3)  # [N, B, C, D]
    ts = targets.reshape(b, n, c).transpose(1, 0, 2)  # [N, B, C]

    @jax.checkpoint
    def chunk(xs):
        h, tgt = xs
        return _head_logps(model, h, tgt, temperature)

    logps, correct = jax.lax.map(chunk, (hs, ts))  # [N, B, C] each
    logps = logps.transpose(1, 0, 2).reshape(b, n * c)[:, :t]  # [B, T]
    if not with_correct:
        return logps
    return logps, correct.transpose(1, 0, 2).reshape(b, n * c)[:, :t]


def hidden_token_logps(
    model,
    hidden: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 0,
    with_correct: bool = False,
):
    """LM head + log-softmax + gather from final hidden states ``[B, T, D]`` for ``targets [B, T]``:
    ``[B, T]`` float32 (and ``correct`` when ``with_correct``). ``chunk_size`` 0 computes the whole
    ``[B, T, V]`` logits at once; > 0 uses :func:`chunked_token_logps`."""
    if chunk_size > 0:
        return chunked_token_logps(
            model, hidden, targets, chunk_size=chunk_size, temperature=temperature, with_correct=with_correct
        )
    logps, correct = _head_logps(model, hidden, targets, temperature)
    return (logps, correct) if with_correct else logps


def shifted_token_logps(
    model,
    tokens: jax.Array,
    attention_mask: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    temperature: float = 1.0,
    chunk_size: int = 0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """``log p(tokens[:, t+1] | tokens[:, :t+1])`` for every ``t``: ``[B, T - 1]`` float32.

    ``temperature`` divides the logits first (GRPO/PPO score completions under the sampling temperature).
    ``chunk_size > 0`` never materialises the full ``[B, T, V]`` logits (see the module docstring).
    ``dropout_key``: a training forward's (LoRA dropout; ``jrft.models.Decoder.hidden``).
    """
    kw = dict(segment_ids=segment_ids, dropout_key=dropout_key)
    if chunk_size > 0:
        hidden = model.hidden(tokens, attention_mask, positions, **kw)  # [B, T, D]
        return chunked_token_logps(
            model, hidden[:, :-1], tokens[:, 1:], chunk_size=chunk_size, temperature=temperature
        )
    logits = model(tokens, attention_mask=attention_mask, positions=positions, **kw)
    logits = logits[:, :-1].astype(jnp.float32)  # [B, T-1, V]
    if temperature != 1.0:
        logits = logits / temperature
    return token_logprobs(logits, tokens[:, 1:])


def sequence_logps(model, tokens, attention_mask, loss_mask, **kwargs) -> tuple[jax.Array, jax.Array]:
    """Summed log-prob of the tokens where ``loss_mask[:, 1:]`` is 1, and their count: ``([B], [B])``.

    ``kwargs`` go to :func:`shifted_token_logps` (``positions``, ``segment_ids``, ``temperature``,
    ``chunk_size``, ``dropout_key``)."""
    mask = loss_mask[:, 1:].astype(jnp.float32)
    logps = shifted_token_logps(model, tokens, attention_mask, **kwargs)
    return jnp.sum(logps * mask, axis=-1), jnp.sum(mask, axis=-1)


def pair_sequence_logps(
    model, batch: Mapping[str, jax.Array], *, chunk_size: int = 0, dropout_key: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Chosen and rejected completions scored in ONE forward pass (concatenated on the batch axis).

    Expects ``chosen_tokens``, ``chosen_attention_mask``, ``chosen_loss_mask`` and the ``rejected_*``
    twins, each ``[B, T]`` (padded to the same T), or the packed rows of :func:`jrft.train.packing.pack_pairs`
    (summed per sequence from the packed rows). Returns ``chosen_logps``, ``rejected_logps``,
    ``chosen_lengths``, ``rejected_lengths``: ``[B]`` each. ``chunk_size``, ``dropout_key``: see
    :func:`shifted_token_logps`.
    """
    if "pack_sequence" in batch:
        return packed_pair_logps(model, batch, chunk_size=chunk_size, dropout_key=dropout_key)
    n = batch["chosen_tokens"].shape[0]

    def both(key):
        return jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)  # [2B, T]

    logps, lengths = sequence_logps(
        model,
        both("tokens"),
        both("attention_mask"),
        both("loss_mask"),
        chunk_size=chunk_size,
        dropout_key=dropout_key,
    )
    return {
        "chosen_logps": logps[:n],
        "rejected_logps": logps[n:],
        "chosen_lengths": lengths[:n],
        "rejected_lengths": lengths[n:],
    }


def packed_pair_logps(
    model, batch: Mapping[str, jax.Array], *, chunk_size: int = 0, dropout_key: jax.Array | None = None
) -> dict[str, jax.Array]:
    """:func:`pair_sequence_logps` on a packed pair batch (:func:`jrft.train.packing.pack_pairs`): the
    summed log-probs and token counts of the chosen and rejected sequences, ``[B]`` each."""
    tokens = batch["packed_tokens"]
    logps = shifted_token_logps(
        model,
        tokens,
        batch["packed_attention_mask"],
        positions=batch["packed_positions"],
        segment_ids=batch["packed_segment_ids"],
        chunk_size=chunk_size,
        dropout_key=dropout_key,
    )  # [R, L-1]: position t predicts token t + 1
    mask = batch["packed_loss_mask"][:, 1:].astype(jnp.float32)
    n = batch["valid"].shape[0]  # pairs here: the whole batch's, or a micro-batch's
    total = batch["pack_pairs"][0]  # pairs of the whole batch
    per = total // n  # micro-batches per batch (1: this is the whole batch)
    g = batch["pack_sequence"][:, 1:]  # the (whole batch's) sequence of each target token
    rejected = (g >= total).astype(g.dtype)
    pair = g - rejected * total  # pair i sits in micro-batch i % per at index i // per
    seq = jnp.where(g >= 2 * total, 2 * n, pair // per + rejected * n)
    sums = segment_sum(logps * mask, seq, 2 * n)  # [2B]
    counts = segment_sum(mask, seq, 2 * n)
    return {
        "chosen_logps": sums[:n],
        "rejected_logps": sums[n:],
        "chosen_lengths": counts[:n],
        "rejected_lengths": counts[n:],
    }


# -- rollout rows: [prompt (left-padded, Tp) | completion (right-padded, Tc)] -------------------------------


def completion_slice(x: jax.Array, tc: int) -> jax.Array:
    """``[N, T, ...] -> [N, Tc, ...]``: the positions that predict (and evaluate) the ``Tc`` completion
    tokens of rollout rows: completion token ``j`` is predicted at position ``Tp - 1 + j``."""
    return x[:, -tc - 1 : -1]


def completion_states(
    model, batch: Mapping[str, jax.Array], *, hidden=None, dropout_key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """``([N, Tc, D] states, [N, Tc] targets)``: the final hidden states that predict (and evaluate) the
    completion tokens of rollout rows, and those tokens.

    ``batch`` holds either the padded rows (``tokens``, ``attention_mask`` ``[N, Tp + Tc]``) or packed rows
    (``pack_index`` and the packed arrays of :func:`jrft.train.packing.pack_rollout`: the trunk runs on the
    packed rows and the states are gathered back into this padded completion layout), and
    ``completion_mask`` (``[N, Tc]``). ``hidden`` (``[N, T, D]``, padded rows only) reuses final hidden
    states already computed. ``dropout_key``: a training forward's (LoRA dropout)."""
    if "pack_index" in batch:
        from jrft.train.packing import completion_hidden_packed

        return completion_hidden_packed(model, batch, dropout_key=dropout_key)
    tokens, tc = batch["tokens"], batch["completion_mask"].shape[1]
    if hidden is None:
        hidden = model.hidden(tokens, batch["attention_mask"], dropout_key=dropout_key)  # [N, T, D]
    return completion_slice(hidden, tc), tokens[:, -tc:]


def completion_logps(
    model,
    batch: Mapping[str, jax.Array],
    *,
    temperature: float,
    chunk_size: int = 0,
    hidden=None,
    states: tuple[jax.Array, jax.Array] | None = None,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """``[N, Tc]`` float32 log-probs of the completion tokens of rollout rows (GRPO, PPO).

    ``batch``: see :func:`completion_states` (padded or packed rows). Logits are divided by ``temperature``
    (the sampling temperature); the LM head runs on the completion positions only (over chunks of
    ``chunk_size`` positions when > 0). ``hidden`` (``[N, T, D]``) or ``states`` (what
    :func:`completion_states` returned) reuse a forward already computed (PPO's value head shares it).
    ``dropout_key``: a training forward's (LoRA dropout).
    """
    if states is None:
        states = completion_states(model, batch, hidden=hidden, dropout_key=dropout_key)
    return hidden_token_logps(model, *states, temperature=temperature, chunk_size=chunk_size)


def completion_values(model, hidden: jax.Array, tc: int | None) -> jax.Array:
    """``[N, Tc]`` float32 values ``V(s_j)`` from the model's scalar head at the completion positions
    (``hidden``: ``[N, T, D]`` padded rows, or ``[N, Tc, D]`` completion states when ``tc`` is None)."""
    states = hidden if tc is None else completion_slice(hidden, tc)
    return model.scalar_head(states).astype(jnp.float32)


def make_completion_forward(
    graphdef: nnx.GraphDef,
    *,
    temperature: float,
    logps: bool = True,
    values: bool = False,
    logits_chunk_size: int = 0,
):
    """Jitted ``(params, rest, batch) -> {"logps"?, "values"?}`` (``[N, Tc]`` each), no gradients: old and
    reference log-probs of GRPO and PPO, and PPO's old values (one forward gives both for a policy with a
    value head). ``batch``: padded or packed rollout rows (:func:`completion_states`)."""

    def forward(model, batch):
        states = completion_states(model, batch)  # ([N, Tc, D], [N, Tc]): padded or packed rows
        out = {}
        if logps:
            out["logps"] = completion_logps(
                model, batch, temperature=temperature, chunk_size=logits_chunk_size, states=states
            )
        if values:
            out["values"] = completion_values(model, states[0], None)
        return out

    return frozen_forward(graphdef, forward)
