"""Listwise (Plackett–Luce) reward model in the trainer (``reward.loss=listwise``): the loss and accuracies on
a fixed ranking batch equal a NumPy reference written from the formula, and a tiny reward model learns a
synthetic ranking on held-out prompts."""

import numpy as np
import pytest

from jrft.config import load_config
from jrft.data import synthetic
from jrft.train.runs.offline import run_offline


def quality_rows(problems, *, seed: int) -> list[dict]:
    """K = 4 completions of ``a+b=`` ranked by quality, shown in a random order: the correct trace > the same
    trace with one wrong answer digit > the trace with an untagged answer > a truncated trace."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in problems:
        best_first = [
            p.completion,
            synthetic.REJECTION_KINDS["wrong_digit"](p, rng),
            synthetic.REJECTION_KINDS["no_answer_tags"](p, rng),
            synthetic.REJECTION_KINDS["truncated"](p, rng),
        ]
        slot_rank = rng.permutation(4)  # slot_rank[slot] = rank of the completion shown in that slot
        completions = [best_first[r] for r in slot_rank]
        ranking = [int(np.flatnonzero(slot_rank == r)[0]) for r in range(4)]  # slots, best first
        rows.append({"prompt": p.prompt, "completions": completions, "ranking": ranking})
    return rows


@pytest.fixture(scope="module")
def ranked(tiny_task):
    task = synthetic.AdditionTask(num_digits=2)
    root = tiny_task["root"]
    train = task.sample(256, split="train", seed=0)
    heldout = task.sample(64, split="heldout", seed=0)
    return {
        "train": synthetic.write_jsonl(quality_rows(train, seed=0), root / "ranked_train.jsonl"),
        "eval": synthetic.write_jsonl(quality_rows(heldout, seed=1), root / "ranked_eval.jsonl"),
    }


def _config(tiny_task, ranked, out, *extra):
    return load_config(
        None,
        [
            "objective=reward",
            "reward.loss=listwise",
            f"output_dir={out}",
            f"model.path={tiny_task['model']}",
            f"data.train={ranked['train']}",
            f"data.eval={ranked['eval']}",
            "data.buckets=32",
            "data.max_length=64",
            "optim.lr=1e-3",
            "optim.warmup_steps=5",
            "train.batch_size=16",
            "train.log_every=5",
            "train.save_every=0",
            *extra,
        ],
    )


def _numpy_plackett_luce(ordered: list[float]) -> float:
    """``-sum_k [s_k - log sum_{j >= k} exp(s_j)]`` for scores listed best first (float64)."""
    s = np.asarray(ordered, np.float64)
    return -sum(s[k] - np.log(np.sum(np.exp(s[k:]))) for k in range(len(s)))


def test_listwise_loss_equals_numpy_plackett_luce_on_a_fixed_batch(tiny_task):
    import jax
    from transformers import AutoTokenizer

    from jrft.data import EncodeOptions, build_dataset
    from jrft.models import from_pretrained
    from jrft.train.objectives import reward

    problems = synthetic.AdditionTask(num_digits=2).sample(3, seed=5)
    rows = quality_rows(problems, seed=3)
    rows[1] = {  # a shorter ranking: K = 4 in the batch, this row's 4th item slot is masked
        "prompt": rows[1]["prompt"],
        "completions": rows[1]["completions"][:3],
        "ranking": [r for r in rows[1]["ranking"] if r < 3],
    }
    tokenizer = AutoTokenizer.from_pretrained(tiny_task["model"])
    data = build_dataset(
        rows, tokenizer, objective="reward", options=EncodeOptions(max_length=64, ranked_as="lists")
    )
    assert data.kind == "ranking"
    (batch,) = list(data.eval_batches(batch_size=4, buckets=32, max_length=64))  # 3 rows + 1 filler
    assert batch["tokens"].shape == (4, 4, 32)
    model = from_pretrained(tiny_task["model"], scalar_head=True, seed=1)

    @jax.jit
    def loss_and_metrics(batch):
        norms = reward.ranking_normalizers(batch)
        return reward.make_listwise_loss_fn(center_coef=0.01)(model, batch, norms, None)

    loss, metrics = jax.device_get(loss_and_metrics(batch))

    score_row = jax.jit(lambda tokens, mask: model.score(tokens, attention_mask=mask)[0])  # [T]
    losses, correct, pairs, top1 = [], 0, 0, 0
    for r, row in enumerate(rows):  # each completion scored alone: the reward at its own last token
        scores = []
        for j in range(len(row["completions"])):
            mask = batch["attention_mask"][r, j][None]
            n = int(mask.sum())
            scores.append(float(score_row(batch["tokens"][r, j][None], mask)[n - 1]))
        ordered = [scores[i] for i in row["ranking"]]
        losses.append(_numpy_plackett_luce(ordered) + 0.01 * sum(scores) ** 2)
        k = len(ordered)
        correct += sum(ordered[i] > ordered[j] for i in range(k) for j in range(i + 1, k))
        pairs += k * (k - 1) // 2
        top1 += all(ordered[0] > s for s in ordered[1:])
    assert pairs == 6 + 3 + 6
    np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], correct / pairs, rtol=1e-6)
    np.testing.assert_allclose(metrics["top1_accuracy"], top1 / 3, rtol=1e-6)


def _mixed_rankings(tiny_task, ranked, n: int = 8):
    """The first ``n`` training rankings as a dataset, with the worst item dropped from rows 0, 3, 6, ...:
    rankings of 3 and 4 items."""
    from transformers import AutoTokenizer

    from jrft.data import EncodeOptions, build_dataset, load_rows

    rows = load_rows(ranked["train"]).rows[:n]
    for row in rows[::3]:
        worst = row["ranking"][-1]
        row["completions"] = [c for i, c in enumerate(row["completions"]) if i != worst]
        row["ranking"] = [r - (r > worst) for r in row["ranking"][:-1]]
    tokenizer = AutoTokenizer.from_pretrained(tiny_task["model"])
    options = EncodeOptions(max_length=64, ranked_as="lists")
    return build_dataset(rows, tokenizer, objective="reward", options=options)


def test_listwise_eval_over_batches_equals_one_big_batch(tiny_task, ranked, tmp_path):
    """Evaluation averages per-batch metrics weighted by the right counts: pairwise accuracy by pairs (the
    two batches hold 18 and 21 pairs), the loss by rankings."""
    import optax

    from jrft.config import MeshConfig
    from jrft.train.evaluation import make_eval_fn
    from jrft.train.runs.offline import OBJECTIVES
    from jrft.train.runs.setup import build_model, mesh_from_config
    from jrft.train.state import create_train_state

    cfg = _config(tiny_task, ranked, tmp_path / "eval")
    mesh = mesh_from_config(MeshConfig(1, 1, 1))
    graphdef, state = create_train_state(build_model(cfg, mesh, scalar_head=True), optax.identity(), seed=0)
    objective = OBJECTIVES["reward"](cfg, graphdef, state)
    data = _mixed_rankings(tiny_task, ranked)
    results = {}
    for size in (4, 8):  # two batches, or one
        batches = lambda size=size: data.eval_batches(batch_size=size, buckets=32, max_length=64)  # noqa: E731
        results[size] = make_eval_fn(graphdef, objective, batches, mesh)(state)
    for key, value in results[8].items():
        np.testing.assert_allclose(results[4][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert 0 < results[8]["accuracy"] < 1


def test_listwise_grad_accumulation_equals_the_full_batch(tiny_task, ranked):
    """Loss, metrics and updated parameters of one step are the same whole or in 2 micro-batches (rankings
    of different lengths, so the global pair count matters)."""
    import jax
    import optax

    from jrft.models import from_pretrained
    from jrft.train.objectives import reward
    from jrft.train.state import create_train_state
    from jrft.train.step import make_train_step

    (batch,) = list(_mixed_rankings(tiny_task, ranked).eval_batches(batch_size=8, buckets=32, max_length=64))
    batch = {k: v for k, v in batch.items() if k != "valid"}
    results = []
    for accum in (1, 2):
        model = from_pretrained(tiny_task["model"], scalar_head=True, seed=1)
        tx = optax.sgd(0.1)
        graphdef, state = create_train_state(model, tx, seed=0)
        step = make_train_step(
            graphdef, reward.make_listwise_loss_fn(), reward.ranking_normalizers, tx, grad_accum=accum
        )
        state, metrics = jax.jit(step)(state, batch)
        results.append((jax.device_get(metrics), [np.asarray(x) for x in jax.tree.leaves(state.params)]))
    (full_metrics, full_params), (acc_metrics, acc_params) = results
    for key in full_metrics:
        np.testing.assert_allclose(acc_metrics[key], full_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for a, b in zip(full_params, acc_params, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # a learning run (~10 s); the default suite keeps its plumbing tests
def test_listwise_reward_model_learns_a_ranking(tiny_task, ranked, tmp_path):
    cfg = _config(tiny_task, ranked, tmp_path / "listwise", "train.steps=40", "train.eval_every=40")
    result = run_offline(cfg, progress=False)
    e = result.eval_metrics
    print("listwise held-out pairwise accuracy", e["accuracy"], "top-1", e["top1_accuracy"])
    assert e["accuracy"] >= 0.9, e  # over all 6 ordered pairs of each held-out ranking (chance: 0.5)
    assert e["top1_accuracy"] >= 0.5, e  # chance: 0.25


def test_listwise_on_pair_rows_is_refused_clearly(tiny_task, tmp_path):
    cfg = load_config(
        None,
        [
            "objective=reward",
            "reward.loss=listwise",
            f"output_dir={tmp_path / 'pairs'}",
            f"model.path={tiny_task['model']}",
            f"data.train={tiny_task['pref_train']}",
            "train.steps=1",
        ],
    )
    with pytest.raises(ValueError, match="listwise needs ranked rows"):
        run_offline(cfg, progress=False)
