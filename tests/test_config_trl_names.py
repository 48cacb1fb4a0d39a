"""TRL's names of settings load as aliases of jrft's keys (one table); both names for one key is an error;
``--print-config`` prints the resolved config with jrft's names."""

from pathlib import Path

import pytest
import yaml

from jrft.config import TRL_ALIASES, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
GRPO = ROOT / "configs" / "grpo.yaml"


def test_every_alias_names_an_existing_key():
    plain = load_config(None).to_dict()
    for alias, key in TRL_ALIASES.items():
        node = plain
        for part in key.split("."):
            assert part in node, (alias, key)
            node = node[part]


def test_trl_config_file_loads_with_jrft_values(tmp_path):
    path = tmp_path / "trl.yaml"
    path.write_text(
        "objective: grpo\n"
        "learning_rate: 3.0e-6\nmax_steps: 7\nsave_steps: 5\nsave_total_limit: 3\nlogging_steps: 2\n"
        "grpo:\n  epsilon: 0.3\n  loss_type: dr_grpo\n  importance_sampling_level: sequence\n"
        "  max_completion_length: 64\n  multi_objective_aggregation: normalize_then_sum\n"
        "  reward_functions: [{name: accuracy}, {name: format}]\n  reward_weights: [1.0, 0.25]\n"
        "dpo:\n  precompute_ref_log_probs: true\nppo:\n  num_ppo_epochs: 2\n"
    )
    cfg = load_config(path)
    assert cfg.optim.lr == pytest.approx(3e-6)
    assert (cfg.train.steps, cfg.train.save_every, cfg.train.keep_last, cfg.train.log_every) == (7, 5, 3, 2)
    g = cfg.grpo
    assert (g.epsilon_low, g.epsilon_high) == (0.3, 0.3)  # TRL: epsilon_high defaults to epsilon
    assert (g.loss_aggregation, g.importance_level, g.max_new_tokens) == ("dr_grpo", "sequence", 64)
    assert g.reward_combine == "normalize_then_sum"
    assert [f.weight for f in g.reward_functions] == [1.0, 0.25]
    assert cfg.dpo.precompute_ref_logps is True and cfg.ppo.num_epochs == 2
    # The resolved config carries jrft's names only.
    text = cfg.to_yaml()
    assert "learning_rate" not in text and "loss_type: dr_grpo" not in text and "epsilon_low: 0.3" in text


def test_trl_names_as_overrides():
    cfg = load_config(
        GRPO,
        [
            "optim.learning_rate=2e-6",
            "max_steps=9",
            "grpo.loss_type=bnpo",
            "grpo.epsilon=0.1",
            "grpo.reward_weights=[2, 3]",
            "ppo.num_ppo_epochs=3",
        ],
    )
    assert cfg.optim.lr == pytest.approx(2e-6) and cfg.train.steps == 9
    assert cfg.grpo.loss_aggregation == "bnpo" and cfg.grpo.epsilon_low == cfg.grpo.epsilon_high == 0.1
    assert [f.weight for f in cfg.grpo.reward_functions] == [2.0, 3.0]
    assert cfg.ppo.num_epochs == 3
    # An override of jrft's name over a file's TRL name (or the reverse) is just an override.
    assert load_config(GRPO, ["grpo.loss_aggregation=grpo"]).grpo.loss_aggregation == "grpo"


@pytest.mark.parametrize(
    "text, names",
    [
        ("optim: {lr: 1.0e-5, learning_rate: 2.0e-5}\n", ("optim.learning_rate", "optim.lr")),
        ("learning_rate: 1.0e-5\noptim: {learning_rate: 2.0e-5}\n", ("optim.learning_rate", "learning_rate")),
        ("grpo: {epsilon: 0.2, epsilon_low: 0.3}\n", ("grpo.epsilon", "grpo.epsilon_low")),
        ("max_steps: 3\ntrain: {steps: 4}\n", ("max_steps", "train.steps")),
        (
            "grpo: {reward_functions: [{name: format, weight: 1}], reward_weights: [2]}\n",
            ("grpo.reward_weights", "grpo.reward_functions.0.weight"),
        ),
    ],
)
def test_both_names_in_a_file_is_an_error_naming_both(tmp_path, text, names):
    path = tmp_path / "both.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    for name in names:
        assert name in str(info.value)


def test_both_names_in_overrides_is_an_error_naming_both():
    with pytest.raises(ConfigError, match=r"grpo\.loss_type and grpo\.loss_aggregation"):
        load_config(GRPO, ["grpo.loss_aggregation=bnpo", "grpo.loss_type=dapo"])
    with pytest.raises(ConfigError, match=r"grpo\.reward_weights: expected a list of 2 weights"):
        load_config(GRPO, ["grpo.reward_weights=[1]"])


@pytest.mark.parametrize("objective", ["sft", "reward", "dpo", "kto", "grpo", "ppo"])
def test_print_config_prints_resolved_yaml_and_exits(objective, capsys):
    from jrft.commands.train import run

    code = run(
        objective, [str(ROOT / "configs" / f"{objective}.yaml"), "learning_rate=4e-6", "--print-config"]
    )
    assert code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["objective"] == objective and printed["optim"]["lr"] == pytest.approx(4e-6)
    assert "learning_rate" not in printed


def test_print_config_reports_a_bad_key(capsys):
    from jrft.commands.train import run

    assert run("sft", [str(ROOT / "configs/sft.yaml"), "optim.lrr=1", "--print-config"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_docs_table_lists_every_alias():
    text = (ROOT / "docs" / "trl.md").read_text()
    for alias, key in TRL_ALIASES.items():
        assert f"`{alias}`" in text and f"`{key}`" in text, alias
