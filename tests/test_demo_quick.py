"""``jrft demo --quick``: every stage runs end to end at toy sizes (plumbing, not learning)."""

import importlib.util
import json

import pytest

from jrft.commands.demo import main


def _png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_grpo_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--quick", "--no-progress", "--out", str(out), "--seed", "3"]) == 0
    text = capsys.readouterr().out
    for stage in ("== build", "== sft", "== eval before", "== grpo", "== export check"):
        assert stage in text, stage
    assert "held-out exact match" in text and "format rate" in text and "time per stage" in text
    assert "before:" in text and "after:" in text  # sample completions
    result = json.loads((out / "result.json").read_text())
    assert set(result["before"]) == {"accuracy", "format_rate"}
    assert {"accuracy", "format_rate", "final_accuracy"} <= set(result["after"])
    assert all(0.0 <= v <= 1.0 for v in (result["before"]["accuracy"], result["after"]["format_rate"]))
    # evaluations: the SFT model at step 0, then every step of the 2-step quick GRPO run
    assert [e[0] for e in result["evals"]] == [0, 1, 2]
    assert [e[0] for e in result["sft_evals"]] == [2, 4]  # quick SFT: 4 steps, held-out eval every 2
    assert _png(out / "report.png") and "report.png" in (out / "report.md").read_text()
    grpo_metrics = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in r for r in grpo_metrics) and any("rewards/mean" in r for r in grpo_metrics)
    assert (out / "sft" / "metrics.jsonl").is_file()
    export = out / "grpo" / "export"
    assert json.loads((export / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (export / "tokenizer.json").is_file()
    assert "from_pretrained" in result["load_check"]["jrft"]
    if importlib.util.find_spec("torch") is not None:
        assert "max |logit diff|" in result["load_check"]["transformers"]


def test_quick_dpo_demo_reports_preference_accuracy(tmp_path, capsys):
    out = tmp_path / "dpo"
    assert main(["--quick", "--no-progress", "--objective", "dpo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out preference acc." in text and "DPO implicit-reward acc." in text
    result = json.loads((out / "result.json").read_text())
    assert 0.0 <= result["before"]["preference_accuracy"] <= 1.0
    assert 0.0 <= result["after"]["implicit_reward_accuracy"] <= 1.0
    assert (out / "dpo" / "export" / "config.json").is_file() and _png(out / "report.png")


@pytest.mark.slow  # ~35 s; the reward-model and PPO stages are tested in test_train_offline/test_train_ppo
def test_quick_rlhf_demo_trains_the_reward_model(tmp_path, capsys):
    out = tmp_path / "rlhf"
    rc = main(["--quick", "--no-progress", "--objective", "rlhf", "--out", str(out)])
    result = json.loads((out / "result.json").read_text())
    assert 0.0 <= result["after"]["rm_preference_accuracy"] <= 1.0
    assert "rm_score" in result["before"]
    assert (out / "reward" / "export" / "config.json").is_file()
    assert rc == 0 and "rm_score" in result["after"]
    # the reward model's pairs reject the SFT policy's own draws where it erred
    rows = [
        json.loads(line) for line in (out / "data" / "pref_train_on_policy.jsonl").read_text().splitlines()
    ]
    assert 0.0 <= result["before"]["sft_sample_accuracy"] <= 1.0
    assert any(r["rejected_kind"] == "policy" for r in rows) and "on-policy pairs" in result["seconds"]
    # the reward model ranked the SFT policy's own draws (reward.rank_samples) before PPO
    for key in ("rm_draw_pairwise_accuracy", "rm_best_of_n_accuracy", "rank_greedy_accuracy"):
        value = result["after"][key]
        assert value != value or 0.0 <= value <= 1.0  # NaN: no prompt had both a right and a wrong draw
    text = capsys.readouterr().out
    assert "its top-scored draw is correct" in text
    # the demo's reward model scores with its language model too, which decodes the task itself
    with open(out / "reward" / "export" / "config.json") as f:
        assert json.load(f)["jrft_reward_likelihood_coef"] == 1.0
    assert 0.0 <= result["after"]["rm_lm_accuracy"] <= 1.0 and "the reward model's own language model" in text


@pytest.mark.slow  # ~10 s; LoRA runs: test_lora_runs; the demo's LoRA settings: test_demo_parts
def test_quick_grpo_demo_with_lora_trains_adapters_only(tmp_path, capsys):
    out = tmp_path / "lora"
    assert main(["--quick", "--no-progress", "--lora", "lora.rank=2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "--lora (rank 2:" in text and "adapter parameters" in text
    result = json.loads((out / "result.json").read_text())
    # quick model: 1 layer, hidden 32, 2 heads x 16, intermediate 64: r x (in + out) per projection
    assert result["lora_rank"] == 2 and result["adapter_params"] == 2 * (4 * 64 + 3 * 96)
    # the GRPO checkpoint holds the adapters, not the base; the export is the merged model
    meta = json.loads((out / "grpo" / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["lora_base"]["path"] == str(out / "sft" / "export")
    export = out / "grpo" / "export"
    assert (export / "config.json").is_file() and (export / "adapter" / "adapter_config.json").is_file()
    if importlib.util.find_spec("torch") is not None:
        assert "max |logit diff|" in result["load_check"]["transformers"]


def test_bad_override_is_reported_with_its_key(capsys):
    assert main(["--quick", "grpo.lrr=1"]) == 2
    assert "grpo.lrr: unknown key" in capsys.readouterr().err


@pytest.mark.slow
def test_full_demo_grpo_improves_heldout_accuracy(tmp_path):
    """The acceptance run on one seed (~10 minutes on an idle 2-core machine)."""
    from jrft.demo import load_demo_config, run_demo

    cfg = load_demo_config(None, [f"output_dir={tmp_path / 'full'}", "seed=1"])
    result = run_demo(cfg, progress=False)
    gain = result.after["accuracy"] - result.before["accuracy"]
    assert gain >= 0.15, (result.before, result.after)
    assert result.after["format_rate"] >= 0.95, result.after
