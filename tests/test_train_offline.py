"""SFT, reward-model and DPO training end to end on a tiny model trained from scratch on the synthetic
addition task: each objective's metric must really move."""

import dataclasses
import inspect
import json
import os

import jax
import numpy as np
import pytest
from conftest import param_arrays
from flax import nnx

from jrft.config import load_config
from jrft.models import from_pretrained
from jrft.train.runs.offline import run_offline


@pytest.fixture(scope="module")
def assets(tiny_task):
    return tiny_task


def _config(assets, objective, out, *extra):
    train, evals = ("sft_train", "sft_eval") if objective == "sft" else ("pref_train", "pref_eval")
    return load_config(
        None,
        [
            f"objective={objective}",
            f"output_dir={out}",
            f"model.path={assets['model']}",
            f"data.train={assets[train]}",
            f"data.eval={assets[evals]}",
            "data.buckets=32",
            "data.max_length=64",
            "optim.lr=3e-3",
            "optim.warmup_steps=5",
            "train.batch_size=16",
            "train.log_every=5",
            "train.save_every=0",
            *extra,
        ],
    )


def _metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_loss_options_are_section_fields_and_every_loss_keyword():
    """Each name of LOSS_OPTIONS is a field of the objective's config section, and together with
    logits_chunk_size they are all of its make_loss_fn's keywords (a new keyword is wired or fails here)."""
    from jrft.config import RunConfig
    from jrft.train.objectives import dpo, kto
    from jrft.train.runs.offline import LOSS_OPTIONS

    for objective, module in (("dpo", dpo), ("kto", kto)):
        fields = {f.name for f in dataclasses.fields(getattr(RunConfig(), objective))}
        keywords = set(inspect.signature(module.make_loss_fn).parameters) - {"logits_chunk_size"}
        assert set(LOSS_OPTIONS[objective]) <= fields
        assert set(LOSS_OPTIONS[objective]) == keywords


@pytest.mark.slow  # a learning run; the default suite keeps its plumbing tests
def test_sft_learns_the_trace_format_and_exports(assets, tmp_path):
    out = tmp_path / "sft"
    result = run_offline(_config(assets, "sft", out, "train.steps=60", "train.eval_every=60"), progress=False)
    rows = _metrics(out)
    first, last = rows[0]["loss"], result.last_metrics["loss"]
    assert last < 0.5 * first, (first, last)
    assert (
        result.eval_metrics["accuracy"] > 0.6
    )  # held-out teacher-forced next-token accuracy (random: ~0.03)
    exported = from_pretrained(out / "export")
    batch = np.asarray([[1, 5, 6, 7]], np.int32)
    final = nnx.merge(*nnx.split(exported))
    assert np.isfinite(np.asarray(final(batch))).all()
    assert os.path.exists(out / "export" / "tokenizer.json")


@pytest.mark.slow  # ~35 s: 200 SFT steps, then greedy generation
def test_sft_model_reproduces_heldout_completions_greedily(assets, tmp_path):
    """SFT on "reverse a 4-digit string" (prompt ``1234=``, completion ``4321``), then greedy generation with
    ``jrft.sampling.generate`` on 100 held-out strings never seen in training: exact match >= 90%."""
    from transformers import AutoTokenizer

    from jrft.data import synthetic
    from jrft.sampling import generate
    from jrft.sampling.text import decode_completions, left_pad

    rng = np.random.default_rng(0)
    strings = list(dict.fromkeys("".join(map(str, rng.integers(0, 10, 4))) for _ in range(3000)))
    train, heldout = strings[:2000], strings[-100:]  # distinct strings: held-out ones are never trained on
    rows = [{"prompt": f"{s}=", "completion": s[::-1]} for s in train]
    out = tmp_path / "reverse"
    cfg = load_config(
        None,
        [
            "objective=sft",
            f"output_dir={out}",
            f"model.path={assets['model']}",
            f"data.train={synthetic.write_jsonl(rows, tmp_path / 'reverse.jsonl')}",
            "data.buckets=16",
            "data.max_length=32",
            "optim.lr=3e-3",
            "optim.warmup_steps=10",
            "train.batch_size=32",
            "train.steps=200",
            "train.log_every=50",
            "train.save_every=0",
        ],
    )
    run_offline(cfg, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out / "export")
    model = from_pretrained(out / "export")
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    prompts = [[bos, *tokenizer(f"{s}=", add_special_tokens=False)["input_ids"]] for s in heldout]
    tokens, mask = left_pad(prompts, pad)
    result = generate(
        model,
        tokens,
        mask,
        max_new_tokens=8,
        temperature=0.0,
        stop_token_ids=[tokenizer.eos_token_id],
        pad_token_id=pad,
    )
    completions = decode_completions(tokenizer, result)
    exact = np.mean([c == s[::-1] for c, s in zip(completions, heldout, strict=True)])
    print("held-out greedy exact match", exact, list(zip(heldout[:5], completions[:5], strict=True)))
    # Exact text match also means the model stopped (EOS) right after the 4 digits.
    assert exact >= 0.9, list(zip(heldout, completions, strict=True))


@pytest.mark.slow  # a learning run (~10 s); the default suite keeps its plumbing tests
def test_reward_model_learns_preferences(assets, tmp_path):
    out = tmp_path / "rm"
    cfg = _config(assets, "reward", out, "train.steps=100", "train.eval_every=100", "optim.lr=1e-3")
    result = run_offline(cfg, progress=False)
    print("reward-model held-out accuracy", result.eval_metrics["accuracy"])
    assert result.eval_metrics["accuracy"] >= 0.9, result.eval_metrics


@pytest.mark.slow  # a learning run; the default suite keeps its plumbing tests
def test_dpo_raises_margins_and_preference_accuracy(assets, tmp_path):
    out = tmp_path / "dpo"
    cfg = _config(
        assets, "dpo", out, "train.steps=30", "train.eval_every=30", "optim.lr=1e-3", "dpo.beta=0.1"
    )
    result = run_offline(cfg, progress=False)
    rows = _metrics(out)
    assert rows[0]["rewards/margins"] < result.last_metrics["rewards/margins"]
    assert result.eval_metrics["rewards/accuracies"] >= 0.9, result.eval_metrics


def test_grad_accumulation_equals_full_batch_through_the_runner(assets, tmp_path):
    finals = []
    for name, micro in (("full", "null"), ("accum", "4")):
        cfg = _config(assets, "sft", tmp_path / name, "train.steps=2", f"train.micro_batch_size={micro}")
        finals.append(param_arrays(run_offline(cfg, progress=False).state))
    # Since warm-up trains at step 1 (lr / warmup_steps, not 0) both steps update: Adam turns last-bit
    # differences of near-zero gradients (summed in another order) into differences of ~lr / 1000.
    for a, b in zip(*finals, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5)


def test_sharded_run_equals_single_device_run(assets, tmp_path):
    assert jax.device_count() == 8
    finals = []
    for name, mesh in (("one", ["mesh.data=1"]), ("sharded", ["mesh.data=2", "mesh.fsdp=4"])):
        cfg = _config(assets, "sft", tmp_path / name, "train.steps=2", *mesh)
        finals.append(param_arrays(run_offline(cfg, progress=False).state))
    for a, b in zip(*finals, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("loss_type", ["simpo", pytest.param("orpo", marks=pytest.mark.slow)])
def test_reference_free_preference_losses_raise_margins(assets, tmp_path, loss_type):
    out = tmp_path / loss_type
    extra = ("dpo.beta=2.0",) if loss_type == "simpo" else ()
    cfg = _config(assets, "dpo", out, "train.steps=20", f"dpo.loss_type={loss_type}", "optim.lr=1e-3", *extra)
    result = run_offline(cfg, progress=False)
    rows = _metrics(out)
    assert rows[0]["rewards/margins"] < result.last_metrics["rewards/margins"]
