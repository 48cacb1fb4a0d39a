"""The demo's parts: settings loading, evaluation functions, report rendering."""

import json

import numpy as np
import pytest
from flax import nnx

from jrft.config import ConfigError
from jrft.data import synthetic
from jrft.demo import evaluate, report
from jrft.demo.settings import QUICK_OVERRIDES, DemoConfig, load_demo_config
from jrft.demo.stages import DemoResult


def test_settings_overrides_quick_and_errors(tmp_path):
    assert load_demo_config() == DemoConfig()
    quick = load_demo_config(quick=True, overrides=["grpo.steps=5", "objective=dpo"])
    assert quick.grpo.steps == 5 and quick.objective == "dpo" and quick.model.num_layers == 1
    assert len(QUICK_OVERRIDES) == len(set(k.split("=")[0] for k in QUICK_OVERRIDES))
    with pytest.raises(ConfigError, match=r"objective: must be one of"):
        load_demo_config(overrides=["objective=ppo"])
    with pytest.raises(ConfigError, match=r"grpo\.num_generations: must be >= 2"):
        load_demo_config(overrides=["grpo.num_generations=1"])
    with pytest.raises(ConfigError, match=r"ppo\.mini_batches: must divide prompts_per_step=128, got 3"):
        load_demo_config(overrides=["ppo.mini_batches=3"])
    bad = tmp_path / "demo.yaml"
    bad.write_text("sft:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"demo\.yaml: sft\.stepz: unknown key"):
        load_demo_config(bad)


def test_lora_settings_reach_the_stage_after_sft_only(tmp_path):
    from jrft.demo.stages import grpo_config, lora_overrides, preference_config, sft_config

    paths = {k: str(tmp_path / f"{k}.jsonl") for k in ("sft_train", "prompts_train", "pref_train")}
    paths["base"] = str(tmp_path / "base")
    off = load_demo_config()
    assert lora_overrides(off) == [] and grpo_config(off, str(tmp_path), paths, "m").lora.rank == 0
    on = load_demo_config(overrides=["lora.enabled=true", "lora.rank=4", "lora.lr=2e-3"])
    grpo = grpo_config(on, str(tmp_path), paths, "m")
    assert (grpo.lora.rank, grpo.lora.alpha, grpo.optim.lr) == (4, 32.0, 2e-3)
    dpo = preference_config(on, str(tmp_path), paths, "m", "dpo")
    assert (dpo.lora.rank, dpo.optim.lr) == (4, 2e-3)
    # the reward model and SFT stay full fine-tuning, at their own learning rates
    assert preference_config(on, str(tmp_path), paths, "m", "reward").lora.rank == 0
    sft = sft_config(on, str(tmp_path), paths)
    assert sft.lora.rank == 0 and sft.optim.lr == on.sft.lr
    with pytest.raises(ConfigError, match=r"lora\.rank: must be positive"):
        load_demo_config(overrides=["lora.rank=0"])


def test_ppo_stage_takes_the_demo_settings_and_extra_overrides(tmp_path):
    from jrft.demo.stages import ppo_config, rewards_yaml

    paths = {"prompts_train": str(tmp_path / "prompts_train.jsonl")}
    cfg = load_demo_config(overrides=["ppo.prompts_per_step=64", "ppo.mini_batches=2", "ppo.lr=3e-5"])
    ppo = ppo_config(cfg, str(tmp_path), paths, "policy", "rm")
    assert (ppo.train.batch_size, ppo.ppo.num_mini_batches, ppo.optim.lr) == (64, 2, 3e-5)
    assert ppo.ppo.reward_model == "rm" and ppo.ppo.reward_functions == ()
    # the probe's control: the checker instead of the reward model
    checker = ["ppo.reward_model=null", f"ppo.reward_functions={rewards_yaml(cfg)}"]
    ppo = ppo_config(cfg, str(tmp_path), paths, "policy", "rm", checker)
    assert ppo.ppo.reward_model is None
    assert [f.name for f in ppo.ppo.reward_functions] == ["accuracy", "format"]


@pytest.fixture(scope="module")
def tiny():
    from jrft.models import Decoder, ModelConfig

    tok = synthetic.arithmetic_tokenizer()
    cfg = ModelConfig(
        family="llama",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=16,
    )
    return tok, Decoder(cfg, rngs=nnx.Rngs(0))


def test_exact_match_and_format_use_the_reward_builtins():
    completions = [
        "<think>1+2+0=03</think><answer>3</answer>",  # correct, formatted
        "<think>x</think><answer>4</answer>",  # wrong, formatted
        "<answer>3</answer>",  # correct, no think block
        "the answer is 3",  # no answer tag: not counted as correct (no last-number fallback)
    ]
    assert evaluate.EXACT_MATCH(completions=completions, answer=["3"] * 4) == [1.0, 0.0, 1.0, 0.0]
    assert evaluate.STRICT_FORMAT(completions=completions) == [1.0, 1.0, 0.0, 0.0]


def test_evaluate_task_chunks_agree_with_one_batch(tiny):
    tok, model = tiny
    rows = synthetic.prompt_rows(synthetic.AdditionTask(num_digits=2).sample(7, split="heldout"))
    whole = evaluate.greedy_completions(
        model, tok, [r["prompt"] for r in rows], max_new_tokens=8, batch_size=8
    )
    chunked = evaluate.greedy_completions(
        model, tok, [r["prompt"] for r in rows], max_new_tokens=8, batch_size=3
    )
    assert whole == chunked and len(whole) == 7
    ev = evaluate.evaluate_task(model, tok, rows, max_new_tokens=8, batch_size=4, num_samples=2)
    assert ev.num == 7 and len(ev.samples) == 2 and ev.samples[0][0] == rows[0]["prompt"]
    assert ev.accuracy == 0.0  # a random model does not add


def test_preference_accuracy_against_numpy_log_probs(tiny):
    tok, model = tiny
    problems = synthetic.AdditionTask(num_digits=2).sample(6, split="heldout")
    pairs = synthetic.preference_rows(problems, seed=0)
    chosen, rejected = evaluate.pair_logps(model, tok, pairs, batch_size=4)
    # reference: one full forward per sequence, log-softmax in NumPy
    for i, row in enumerate(pairs):
        p = evaluate.prompt_ids(tok, row["prompt"])
        c = tok(row["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = np.asarray([p + c], np.int32)
        logits = np.asarray(model(ids, np.ones_like(ids)), np.float64)[0]
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        want = sum(logp[len(p) - 1 + j, t] for j, t in enumerate(c))
        np.testing.assert_allclose(chosen[i], want, rtol=1e-4, atol=1e-4)
    assert evaluate.preference_accuracy(model, tok, pairs) == np.mean(chosen > rejected)
    # against itself as the reference every implicit reward margin is 0: nothing is preferred
    assert evaluate.preference_accuracy(model, tok, pairs, reference=model) == 0.0


def test_reward_scores_read_the_last_real_token(tiny):
    from jrft.models import Decoder

    tok, model = tiny
    rm = Decoder(model.config, rngs=nnx.Rngs(1), scalar_head=True)
    prompts, completions = ["1+2=", "10+20="], ["<answer>3</answer>", "<think>0+0+0=00</think>"]
    scores = evaluate.reward_scores(rm, tok, prompts, completions)
    for i in range(2):
        ids = (
            evaluate.prompt_ids(tok, prompts[i]) + tok(completions[i], add_special_tokens=False)["input_ids"]
        )
        ids = np.asarray([ids + [tok.eos_token_id]], np.int32)
        np.testing.assert_allclose(scores[i], np.asarray(rm.score(ids, np.ones_like(ids)))[0, -1], rtol=1e-5)


def test_report_table_plot_and_samples(tmp_path):
    metrics = tmp_path / "grpo.jsonl"
    metrics.write_text(
        "\n".join(json.dumps({"step": s, "rewards/mean": 0.1 * s, "loss": 1.0}) for s in range(1, 5)) + "\n"
    )
    result = DemoResult(
        objective="grpo",
        output_dir=str(tmp_path),
        seconds={"sft": 60.0, "grpo": 120.0},
        before={"accuracy": 0.45, "format_rate": 0.99},
        after={"accuracy": 0.70, "format_rate": 0.98, "final_accuracy": 0.72, "evals_averaged": 3.0},
        metrics_files={"grpo": str(metrics)},
        samples_before=(("1+2=", "<answer>4</answer>", "3"),),
        samples_after=(("1+2=", "<answer>3</answer>", "3"),),
        evals=[(0, 0.45, 0.99), (2, 0.6, 0.98), (4, 0.7, 0.98)],
    )
    text = report.table(result)
    assert "45.0%" in text and "70.0%" in text and "+25.0 pt" in text and "grpo 120s" in text
    assert "before: <answer>4</answer>" in report.samples(result)
    assert report.read_curve(str(metrics), ("kl_mean", "rewards/mean"))[0] == "rewards/mean"
    assert report.read_curve(str(metrics), ("kl_mean",)) is None
    out, png = report.write_report(result)
    assert open(png, "rb").read(4) == b"\x89PNG" and "plot:" in out


def test_report_drops_empty_kl_and_puts_sft_and_grpo_accuracy_on_one_clock(tmp_path):
    sft, grpo = tmp_path / "sft.jsonl", tmp_path / "grpo.jsonl"
    sft.write_text(
        "\n".join(json.dumps({"step": s, "time": 10.0 * s, "eval/accuracy": 0.1 * s}) for s in (1, 2)) + "\n"
    )
    grpo.write_text(
        "\n".join(
            json.dumps({"step": s, "time": 6.0 * s, "rewards/mean": 0.5, "kl_mean": 0.0}) for s in (1, 2, 3)
        )
        + "\n"
        + json.dumps({"step": 3, "time": 30.0, "eval/accuracy": 0.5})
        + "\n"
    )
    result = DemoResult(
        objective="grpo",
        output_dir=str(tmp_path),
        seconds={"build": 6.0, "sft": 30.0, "eval before": 24.0, "grpo": 60.0},
        metrics_files={"sft": str(sft), "grpo": str(grpo)},
        sft_evals=[(1, 0.1, 1.0), (2, 0.2, 1.0)],
        evals=[(0, 0.2, 1.0), (3, 0.5, 1.0)],
    )
    titles = [p[0] for p in report._panels(result)]
    assert "GRPO reward (mean)" in titles and not any("KL" in t for t in titles)  # beta = 0: no KL panel
    (s_label, s_min, s_acc), (g_label, g_min, g_acc) = report.accuracy_timeline(result)
    assert (s_label, g_label) == ("SFT", "GRPO")
    np.testing.assert_allclose(s_min, [(6 + 10) / 60, (6 + 20) / 60])  # after the build stage
    np.testing.assert_allclose(g_min, [1.0, (60 + 30) / 60])  # step 0 = the SFT model, at GRPO's start
    np.testing.assert_allclose(g_acc, [20.0, 50.0])
    assert open(report.plot(result, str(tmp_path / "r.png")), "rb").read(4) == b"\x89PNG"


def test_rlhf_report_says_when_ppo_raised_the_score_but_exact_match_fell(tmp_path):
    ppo = tmp_path / "ppo.jsonl"
    ppo.write_text("".join(json.dumps({"step": s, "kl_mean": 0.01 * s}) + "\n" for s in (1, 2)))
    result = DemoResult(
        objective="rlhf",
        output_dir=str(tmp_path),
        before={"rm_score": -1.5, "accuracy": 0.40},
        after={"rm_score": 0.2, "accuracy": 0.25},
        metrics_files={"ppo": str(ppo)},
    )
    note = report.reward_hacking_note(result)
    assert "exact match FELL (40.0% -> 25.0%)" in note and "0.020 nats/token" in note
    assert note in report.table(result)
    result.after["accuracy"] = 0.45
    assert "FELL" not in report.reward_hacking_note(result) and "40.0% -> 45.0%" in report.table(result)
    assert report.reward_hacking_note(DemoResult(objective="grpo", output_dir="", before={}, after={})) == ""


def test_rank_draws_against_a_loop_over_pairs():
    from jrft.demo.preferences import rank_draws

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 6)).round(1)  # ties: a tie is not a win
    correct = rng.random((40, 6)) < 0.4
    greedy = rng.random(40) < 0.5
    wins = pairs = 0
    for i in range(40):
        for a in range(6):
            for b in range(6):
                if correct[i, a] and not correct[i, b]:
                    pairs += 1
                    wins += scores[i, a] > scores[i, b]
    got = rank_draws(scores, correct, greedy)
    assert got["within_prompt_pairs"] == pairs
    assert got["within_prompt_pairwise_accuracy"] == pytest.approx(wins / pairs)
    best = [correct[i, int(np.argmax(scores[i]))] for i in range(40)]
    assert got["best_of_n_accuracy"] == pytest.approx(np.mean(best))
    assert got["sample_accuracy"] == pytest.approx(correct.mean())
    assert got["greedy_accuracy"] == pytest.approx(greedy.mean())
    # a reward model that puts every correct draw first
    perfect = rank_draws(correct.astype(float), correct)
    assert perfect["within_prompt_pairwise_accuracy"] == 1.0 and "greedy_accuracy" not in perfect
    assert perfect["best_of_n_accuracy"] == pytest.approx(correct.any(axis=1).mean())
    with pytest.raises(ValueError, match=r"must both be \[prompts, G\]"):
        rank_draws(scores[0], correct[0])


def test_on_policy_pairs_replace_rejected_with_the_policys_first_wrong_draw(tiny, monkeypatch):
    from jrft.demo import preferences

    problems = synthetic.AdditionTask(num_digits=2).sample(3, split="train", seed=1)
    rows = synthetic.preference_rows(problems, seed=1)
    right = [p.completion for p in problems]
    wrong_format = "<answer>1</answer>"
    draws = [[right[0], ""], [right[1], wrong_format], ["<think>x</think><answer>0</answer>", right[2]]]
    monkeypatch.setattr(preferences, "sampled_completions", lambda *a, **k: draws)
    out, stats = preferences.on_policy_pairs(None, None, rows, num_samples=2, max_new_tokens=8, batch_size=4)
    assert out[0] == rows[0]  # no non-empty wrong draw: the synthetic rejection stays
    assert out[1]["rejected"] == wrong_format and out[1]["rejected_kind"] == "policy"
    assert out[2]["rejected"] == draws[2][0] and out[2]["chosen"] == rows[2]["chosen"]
    assert stats == {"sample_accuracy": 3 / 6, "policy_rejected_fraction": 2 / 3}
    with pytest.raises(ValueError, match="no <answer> tag"):
        preferences.answer_of("<think>1</think>")
    monkeypatch.undo()
    tok, model = tiny  # the real sampler: G draws per prompt, a random model gets them wrong
    out, stats = preferences.on_policy_pairs(model, tok, rows, num_samples=3, max_new_tokens=8, batch_size=2)
    assert stats["sample_accuracy"] == 0.0 and all(r["rejected_kind"] == "policy" for r in out)
