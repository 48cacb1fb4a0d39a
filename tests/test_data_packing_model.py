"""Packed rows through the real decoder equal the unpacked examples: same logits, same SFT loss."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jrft.data import BatchIterator, build_dataset
from jrft.data.batching import collate_sft
from jrft.data.synthetic import AdditionTask, arithmetic_tokenizer, sft_rows
from jrft.models import Decoder, ModelConfig
from jrft.models.testing import tiny_hf_config


def token_nll(logits, tokens, loss_mask):
    """Summed next-token NLL over targets (``loss_mask[:, 1:]``) and their count."""
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    mask = loss_mask[:, 1:]
    return float(jnp.sum(nll * mask)), int(mask.sum())


def test_packed_equals_unpacked_through_the_model():
    tok = arithmetic_tokenizer()
    rows = sft_rows(AdditionTask(num_digits=2).sample(12, seed=0))
    ds = build_dataset(rows, tok, objective="sft")
    cfg = ModelConfig.from_hf(tiny_hf_config("llama", vocab_size=len(tok)))
    model = nnx.jit(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))()  # jitted init: far faster than eager here
    forward = nnx.jit(lambda m, *args, **kw: m(*args, **kw))

    packed_it = BatchIterator(
        ds.examples,
        kind="sft",
        batch_size=2,
        buckets=16,
        max_length=96,
        packing=True,
        shuffle=False,
        process_index=0,
        process_count=1,
    )
    units = packed_it.units(0)[:2]
    batch = next(packed_it)
    assert batch["segment_ids"].max() >= 3  # several documents per row
    logits = forward(
        model,
        jnp.asarray(batch["tokens"]),
        jnp.asarray(batch["attention_mask"]),
        jnp.asarray(batch["positions"]),
        segment_ids=jnp.asarray(batch["segment_ids"]),
    )
    packed_nll, packed_count = token_nll(logits, batch["tokens"], batch["loss_mask"])

    # the same examples unpacked: one right-padded row each, no segment ids
    flat = [i for unit in units for i in unit]
    single = collate_sft(ds.examples, [[i] for i in flat], 48, ds.pad_id)
    single_logits = forward(
        model,
        jnp.asarray(single["tokens"]),
        jnp.asarray(single["attention_mask"]),
        jnp.asarray(single["positions"]),
    )
    k = 0
    for r, unit in enumerate(units):
        for s, i in enumerate(unit, start=1):
            n = len(ds.examples[i]["tokens"])
            sl = batch["segment_ids"][r] == s
            np.testing.assert_allclose(np.asarray(logits[r][sl]), np.asarray(single_logits[k, :n]), atol=1e-5)
            k += 1
    nll, count = token_nll(single_logits, single["tokens"], single["loss_mask"])
    assert packed_count == count
    np.testing.assert_allclose(packed_nll, nll, rtol=1e-5)
