"""The batch iterator: deterministic, exact resume, per-epoch shuffles, disjoint and complete shards."""

import json

import numpy as np
import pytest

from jrft.config import load_config
from jrft.data import (
    BatchIterator,
    datasets_from_config,
    eval_batches_from_config,
    train_iterator_from_config,
)
from jrft.data.synthetic import AdditionTask, arithmetic_tokenizer, sft_rows, write_jsonl


def examples(n):
    # example i holds token i + 10 so every batch row tells which example it is
    return [
        {"tokens": np.array([1, i + 10], np.int32), "loss_mask": np.array([0, 1], np.int8)} for i in range(n)
    ]


def ids(batch):
    return (batch["tokens"][:, 1] - 10).tolist()


def make(n=10, batch_size=4, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return BatchIterator(examples(n), kind="sft", batch_size=batch_size, buckets=2, **kw)


def test_deterministic_and_each_epoch_is_a_permutation():
    a, b = make(seed=5), make(seed=5)
    seq_a = [i for _ in range(10) for i in ids(next(a))]
    seq_b = [i for _ in range(10) for i in ids(next(b))]
    assert seq_a == seq_b
    epochs = [seq_a[k : k + 10] for k in range(0, 40, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    c, d = make(seed=6), make(shuffle=False)
    assert seq_a != [i for _ in range(10) for i in ids(next(c))]  # the seed matters
    assert [i for _ in range(5) for i in ids(next(d))] == list(range(10)) * 2


def test_resume_is_exact_mid_epoch_and_across_epochs():
    for stop in (1, 2, 3, 7):
        ref = make(seed=1)
        for _ in range(stop):
            next(ref)
        state = json.loads(json.dumps(ref.state_dict()))  # survives a JSON round trip (checkpoint meta)
        expected = [ids(next(ref)) for _ in range(6)]
        resumed = make(seed=1)
        resumed.load_state_dict(state)
        assert [ids(next(resumed)) for _ in range(6)] == expected
    # a resumed iterator over different data refuses the state
    other = make(n=11, seed=1)
    with pytest.raises(ValueError, match="num_examples=10, this run has 11"):
        other.load_state_dict(state)


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_are_disjoint_and_complete(count):
    iters = [make(n=24, batch_size=8, seed=2, process_index=p, process_count=count) for p in range(count)]
    ref = make(n=24, batch_size=8, seed=2)
    for _ in range(6):
        shards = [ids(next(it)) for it in iters]
        assert all(len(s) == 8 // count for s in shards)
        flat = [i for s in shards for i in s]
        assert len(set(flat)) == len(flat)  # disjoint
        assert flat == ids(next(ref))  # together exactly the global batch
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        make(batch_size=8, process_index=0, process_count=3)


def test_process_shards_share_the_padded_length():
    rows = [
        {"tokens": np.arange(n, dtype=np.int32) + 3, "loss_mask": np.ones(n, np.int8)} for n in (2, 3, 30, 4)
    ]
    shapes = set()
    for p in range(2):
        it = BatchIterator(
            rows, kind="sft", batch_size=4, buckets=8, shuffle=False, process_index=p, process_count=2
        )
        shapes.add(next(it)["tokens"].shape)
    assert shapes == {(2, 32)}


def test_pipeline_from_config(tmp_path):
    task = AdditionTask()
    train = write_jsonl(sft_rows(task.sample(20, seed=0)), tmp_path / "train.jsonl")
    heldout = write_jsonl(sft_rows(task.sample(5, split="heldout", seed=0)), tmp_path / "eval.jsonl")
    cfg = load_config(
        None,
        [
            f"data.train={train}",
            f"data.eval={heldout}",
            "data.max_length=128",
            "data.buckets=16",
            "train.batch_size=4",
            "seed=3",
            "data.packing=true",
        ],
    )
    tok = arithmetic_tokenizer()
    tr, ev = datasets_from_config(cfg, tok)
    assert len(tr) == 20 and len(ev) == 5 and tr.format == "prompt_completion"
    it = train_iterator_from_config(cfg, tr, process_index=0, process_count=1)
    batch = next(it)
    assert batch["tokens"].shape[0] == 4 and batch["tokens"].shape[1] in (96, 112, 128)
    assert batch["segment_ids"].max(axis=1).tolist() == [2, 2, 2, 2]  # ~44-token rows: two per 128
    evals = list(eval_batches_from_config(cfg, ev))
    assert len(evals) == 2 and evals[-1]["valid"].tolist() == [1, 0, 0, 0]


def test_listwise_reward_config_gives_ranking_batches():
    row = "{prompt: '1+1=', completions: ['2', '3', '11'], ranking: [0, 2, 1]}"
    cfg = load_config(
        None,
        [
            "objective=reward",
            "reward.loss=listwise",
            "train.batch_size=2",
            "data.buckets=8",
            f"data.train=[{row}, {row}]",
        ],
    )
    tr, _ = datasets_from_config(cfg, arithmetic_tokenizer())
    batch = next(train_iterator_from_config(cfg, tr, process_index=0, process_count=1))
    assert batch["tokens"].shape == (2, 3, 8) and batch["ranking"].tolist() == [[0, 2, 1]] * 2
