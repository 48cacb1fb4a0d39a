"""Buckets, packing (packed equals unpacked), and batch layouts."""

import numpy as np
import pytest

from jrft.data import BatchIterator, bucket_length, eval_batches, pack_first_fit
from jrft.data.batching import collate_preference, collate_prompt, collate_sft


def sft_examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        mask = (rng.random(n) < 0.6).astype(np.int8)
        mask[0] = 0
        mask[-1] = 1
        out.append({"tokens": rng.integers(3, 50, n).astype(np.int32), "loss_mask": mask})
    return out


def test_bucket_length():
    assert [bucket_length(n, 64) for n in (1, 63, 64, 65, 200)] == [64, 64, 64, 128, 256]
    assert bucket_length(90, 64, max_length=100) == 100  # capped at max_length ...
    assert bucket_length(120, 64, max_length=100) == 128  # ... but never below the row
    assert [bucket_length(n, (16, 48, 128)) for n in (3, 16, 17, 128)] == [16, 16, 48, 128]
    with pytest.raises(ValueError, match="longer than the largest bucket 128"):
        bucket_length(129, (16, 48, 128))


def test_buckets_bound_the_number_of_shapes():
    lengths = np.random.default_rng(0).integers(2, 200, 300)
    it = BatchIterator(
        sft_examples(lengths),
        kind="sft",
        batch_size=4,
        buckets=64,
        max_length=256,
        process_index=0,
        process_count=1,
    )
    for _ in range(60):
        batch = next(it)
        t = batch["tokens"].shape[1]
        assert t % 64 == 0 and t >= batch["attention_mask"].sum(1).max()
    assert {t for _, t in it.shapes_seen} <= {64, 128, 192, 256}


def test_pack_first_fit_respects_capacity_and_keeps_every_example():
    lengths = np.random.default_rng(1).integers(1, 50, 200)
    rows = pack_first_fit(np.arange(200), lengths, capacity=64)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) < 200 * 0.6  # real packing happened
    with pytest.raises(ValueError, match="more than the packing capacity"):
        pack_first_fit([0], [65], capacity=64)


def test_packed_rows_equal_unpacked_examples():
    examples = sft_examples([5, 9, 3, 12, 7, 4, 8])
    units = [[0, 1, 2], [3, 4], [5, 6]]
    packed = collate_sft(examples, units, 32, pad_id=0)
    for r, unit in enumerate(units):
        seg = packed["segment_ids"][r]
        assert sorted(set(seg.tolist()) - {0}) == list(range(1, len(unit) + 1))
        for s, i in enumerate(unit, start=1):
            sl = seg == s
            single = collate_sft(examples, [[i]], 16, pad_id=0)
            n = len(examples[i]["tokens"])
            for key in ("tokens", "loss_mask", "positions", "attention_mask"):
                np.testing.assert_array_equal(packed[key][r][sl], single[key][0][:n], err_msg=key)
            assert packed["positions"][r][sl].tolist() == list(range(n))  # positions restart per segment
            assert packed["loss_mask"][r][sl][0] == 0  # no target across a document boundary
        pad = seg == 0
        assert not packed["attention_mask"][r][pad].any() and not packed["loss_mask"][r][pad].any()
    # total targets are unchanged by packing
    assert packed["loss_mask"].sum() == sum(int(e["loss_mask"].sum()) for e in examples)


def test_packed_iterator_covers_each_example_once_per_epoch():
    lengths = np.random.default_rng(2).integers(2, 30, 50)
    examples = sft_examples(lengths)
    it = BatchIterator(
        examples,
        kind="sft",
        batch_size=2,
        buckets=8,
        max_length=64,
        packing=True,
        seed=3,
        process_index=0,
        process_count=1,
    )
    units = it.units(0)
    assert sorted(i for u in units for i in u) == list(range(50))
    batch = next(it)
    assert batch["tokens"].shape == (2, 64) or batch["tokens"].shape[1] <= 64
    # the batch is exactly the first two packed rows of epoch 0
    np.testing.assert_array_equal(
        batch["tokens"], collate_sft(examples, units[:2], batch["tokens"].shape[1], 0)["tokens"]
    )


def test_preference_and_prompt_layouts():
    pref = [
        {
            "chosen_tokens": np.array([1, 2, 3]),
            "chosen_loss_mask": np.array([0, 0, 1]),
            "rejected_tokens": np.array([1, 2, 4, 5]),
            "rejected_loss_mask": np.array([0, 0, 1, 1]),
            "group": 7,
            "margin": 0.5,
        },
    ]
    b = collate_preference(pref, [[0], []], 8, pad_id=9)
    assert b["chosen_tokens"].shape == b["rejected_tokens"].shape == (2, 8)
    assert b["chosen_tokens"][0].tolist() == [1, 2, 3, 9, 9, 9, 9, 9]
    assert b["rejected_attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert b["group"].tolist() == [7, -1] and b["margin"].tolist() == [0.5, 0.0]
    prompts = [
        {"prompt_tokens": np.array([5, 6]), "prompt": "ab", "columns": {"answer": "1"}},
        {"prompt_tokens": np.array([5, 6, 7, 8]), "prompt": "abcd", "columns": {"answer": "2", "x": 3}},
    ]
    p = collate_prompt(prompts, [[0], [1]], 6, pad_id=0)
    assert p["prompt_tokens"].tolist() == [[0, 0, 0, 0, 5, 6], [0, 0, 5, 6, 7, 8]]  # left padded
    assert p["prompt_positions"].tolist() == [[0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 2, 3]]
    assert p["prompts"] == ["ab", "abcd"]
    assert p["columns"] == {"answer": ["1", "2"], "x": [None, 3]}


def test_eval_batches_pad_the_last_batch():
    examples = sft_examples([4, 5, 6, 7, 8])
    batches = list(eval_batches(examples, kind="sft", batch_size=2, buckets=8))
    assert len(batches) == 3
    assert all(b["tokens"].shape == (2, 8) for b in batches)
    assert [b["valid"].tolist() for b in batches] == [[1, 1], [1, 1], [1, 0]]
    assert batches[-1]["attention_mask"][1].sum() == 0
    assert len(list(eval_batches(examples, kind="sft", batch_size=2, buckets=8, max_batches=2))) == 2
