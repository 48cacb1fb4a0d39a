"""Config loading: every YAML under configs/ loads, overrides apply, bad keys/values are named."""

from pathlib import Path

import pytest
import yaml

from jrft.config import ConfigError, RunConfig, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
# demo.yaml is the demo's own schema, not a RunConfig: checked by its loader below.
ALL_YAMLS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.name != "demo.yaml")


def test_configs_dir_is_not_empty():
    names = {p.name for p in ALL_YAMLS}
    assert {"sft.yaml", "reward.yaml", "dpo.yaml", "grpo.yaml", "ppo.yaml"} <= names


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # to_dict round-trips through YAML to an equal config
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_demo_yaml_loads_with_the_demo_loader():
    from jrft.demo.settings import DemoConfig, load_demo_config

    assert load_demo_config(ROOT / "configs" / "demo.yaml") == DemoConfig()


def test_objective_yamls_name_their_objective():
    for objective in ("sft", "reward", "dpo", "grpo", "ppo"):
        assert load_config(ROOT / "configs" / f"{objective}.yaml").objective == objective


def test_overrides_parse_yaml_scalars():
    cfg = load_config(
        ROOT / "configs/sft.yaml",
        [
            "optim.lr=1e-4",  # YAML 1.1 reads this as a string; float fields accept it
            "train.steps=7",
            "data.train=other.jsonl",
            "data.buckets=[128, 256]",
            "data.packing=true",
            "model.tokenizer=tok/",
            "optim.max_grad_norm=null",
            "optim.betas=[0.9, 0.95]",
        ],
    )
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.train.steps == 7
    assert cfg.data.train.path == "other.jsonl" and cfg.data.train.rows is None
    assert cfg.data.buckets == (128, 256)
    assert cfg.data.packing is True
    assert cfg.model.tokenizer_path == "tok/"
    assert cfg.optim.max_grad_norm is None
    assert cfg.optim.betas == (0.9, 0.95)


def test_defaults_and_derived_values():
    cfg = load_config(None, ["model.path=m", "train.batch_size=16", "train.micro_batch_size=4"])
    assert cfg.model.tokenizer_path == "m"
    assert cfg.train.grad_accum == 4
    assert load_config(None).train.grad_accum == 1


def test_inline_rows_and_reward_functions():
    cfg = load_config(
        None,
        [
            "objective=grpo",
            "data.train=[{prompt: '1+1=', answer: '2'}]",
            "grpo.reward_functions=[{name: accuracy, weight: 2.0, kwargs: {tolerance: 0.01}}, {spec: 'm:f'}]",
        ],
    )
    assert cfg.data.train.rows == ({"prompt": "1+1=", "answer": "2"},)
    rf = cfg.grpo.reward_functions
    assert rf[0].as_runner_spec() == {"name": "accuracy", "weight": 2.0, "tolerance": 0.01}
    assert rf[1].as_runner_spec() == {"name": "m:f", "weight": 1.0}


def test_ppo_mini_batches_must_divide_the_batch_at_load():
    with pytest.raises(ConfigError, match=r"ppo\.num_mini_batches.*must divide train\.batch_size=16"):
        load_config(ROOT / "configs/ppo.yaml", ["ppo.num_mini_batches=3"])
    assert load_config(ROOT / "configs/ppo.yaml", ["ppo.num_mini_batches=4"]).ppo.num_mini_batches == 4


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("bogus=1", "bogus"),
        ("optim.lr=abc", "optim.lr"),
        ("optim.lr=-1", "optim.lr"),
        ("train.batch_size=1.5", "train.batch_size"),
        ("train.batch_size=true", "train.batch_size"),
        ("data.overlong=cut", "data.overlong"),
        ("data.buckets=[256, 128]", "data.buckets"),
        ("mesh.fsdp=-1", "mesh.data"),
        ("train.micro_batch_size=5", "train.micro_batch_size"),
        ("grpo.reward_functions=[{weight: 1}]", "grpo.reward_functions.0.name"),
        ("grpo.num_generations=1", "grpo.num_generations"),
        ("grpo.kl_estimator=k4", "grpo.kl_estimator"),
        ("dpo.loss_type=nope", "dpo.loss_type"),
        ("grpo.baseline=grpo", "grpo.baseline"),
        ("grpo.reward_functions=[{spec: nocolon}]", "grpo.reward_functions.0.spec"),
        ("dpo.beta=0", "dpo.beta"),
        ("ppo.gamma=2", "ppo.gamma"),
        ("model.dtype=float8", "model.dtype"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("data.train={split: test}", "data.train.path"),
        ("data.train.limit=0", "data.train.limit"),
        ("grpo.reward_functions.5.weight=2", "grpo.reward_functions.5"),
        ("grpo.reward_functions.0.weight=x", "grpo.reward_functions.0.weight"),
    ],
)
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs/grpo.yaml", [override])
    msg = str(info.value)
    assert key in msg, msg
    assert "grpo.yaml" in msg


def test_bad_yaml_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective: sft\noptim:\n  lr: 1e-4\n  warmpu_steps: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: optim\.warmpu_steps: unknown key"):
        load_config(bad)
    bad.write_text("objective: sft\ntrain:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.steps: expected int"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: the top level must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_malformed_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"])


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]


def test_override_into_list_items_and_shorthand_sections():
    cfg = load_config(
        ROOT / "configs/grpo.yaml",
        ["grpo.reward_functions.1.weight=0.5", "data.train.limit=10", "data.eval=e.jsonl"],
    )
    assert cfg.grpo.reward_functions[1].weight == 0.5
    assert cfg.data.train.limit == 10 and cfg.data.train.path == "data/prompts.jsonl"
    assert cfg.data.eval.path == "e.jsonl"


def test_remat_policy_names_match_the_model():
    from jrft.config import REMAT_POLICIES
    from jrft.models.layers import REMAT_POLICIES as MODEL_POLICIES

    assert set(REMAT_POLICIES) == set(MODEL_POLICIES)


def test_choice_lists_match_the_registries_they_select_from():
    import typing

    from jrft.config import DPO_LOSS_TYPES, GRPOConfig, PPOConfig
    from jrft.losses import DPO_LOSSES
    from jrft.losses.common import KL_ESTIMATORS
    from jrft.losses.grpo import AGGREGATIONS, BASELINES, IMPORTANCE_LEVELS
    from jrft.rewards.combine import COMBINERS

    def choices(cls, name):
        return set(typing.get_args(typing.get_type_hints(cls)[name]))

    assert set(DPO_LOSS_TYPES) == set(DPO_LOSSES) | {"simpo", "orpo"}
    from jrft.config import DPO_SMOOTHED
    from jrft.losses.dpo import SMOOTHED_LOSSES
    from jrft.losses.grpo import STD_KINDS

    assert set(DPO_SMOOTHED) == SMOOTHED_LOSSES
    assert choices(GRPOConfig, "reward_std") == set(STD_KINDS)
    assert choices(GRPOConfig, "baseline") == set(BASELINES)
    assert choices(GRPOConfig, "importance_level") == set(IMPORTANCE_LEVELS)
    assert choices(GRPOConfig, "loss_aggregation") == set(AGGREGATIONS)
    assert choices(GRPOConfig, "kl_estimator") == choices(PPOConfig, "kl_estimator") == set(KL_ESTIMATORS)
    assert choices(GRPOConfig, "reward_combine") == choices(PPOConfig, "reward_combine") == set(COMBINERS)


def test_reward_entries_build_with_the_rewards_registry():
    from jrft.rewards import RewardRunner

    cfg = load_config(ROOT / "configs/grpo.yaml")
    runner = RewardRunner.from_config(
        [r.as_runner_spec() for r in cfg.grpo.reward_functions], timeout=cfg.grpo.reward_timeout_s
    )
    assert runner.names == ["accuracy", "format"]
    assert runner.weights.tolist() == [1.0, 0.1]
    runner.close()


def test_label_smoothing_only_for_losses_that_use_it():
    assert load_config(None, ["dpo.loss_type=robust", "dpo.label_smoothing=0.1"]).dpo.label_smoothing == 0.1
    with pytest.raises(ConfigError, match=r"dpo\.label_smoothing: only the sigmoid and robust"):
        load_config(None, ["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"])


def test_with_overrides_derives_a_new_config():
    base = load_config(ROOT / "configs/sft.yaml")
    grpo = base.with_overrides(
        [
            "objective=grpo",
            "output_dir=runs/x",
            "grpo.num_generations=4",
            "grpo.reward_functions=[{name: format}]",
        ]
    )
    assert (grpo.objective, grpo.output_dir, grpo.grpo.num_generations) == ("grpo", "runs/x", 4)
    assert grpo.model == base.model and base.objective == "sft"
    with pytest.raises(ConfigError, match=r"overrides: grpo\.num_generations: must be >= 2"):
        base.with_overrides(["grpo.num_generations=1"])


def test_rl_objectives_need_a_reward():
    with pytest.raises(ConfigError, match=r"ppo\.reward_model: PPO needs a reward"):
        load_config(ROOT / "configs/ppo.yaml", ["ppo.reward_model=null"])
    assert load_config(
        ROOT / "configs/ppo.yaml", ["ppo.reward_model=null", "ppo.reward_functions=[{name: format}]"]
    )
    with pytest.raises(ConfigError, match=r"grpo\.reward_functions: GRPO needs at least one"):
        load_config(ROOT / "configs/grpo.yaml", ["grpo.reward_functions=[]"])
    assert load_config(None).ppo.reward_functions == ()  # other objectives need no reward at all


def test_grad_accum_for_equals_the_offline_grpo_and_ppo_rules():
    from jrft.config import TrainConfig

    for batch_size in range(1, 13):
        divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
        for micro in [None, *divisors]:
            train = TrainConfig(batch_size=batch_size, micro_batch_size=micro)
            offline = 1 if micro is None else batch_size // micro
            assert train.grad_accum == train.grad_accum_for(batch_size) == offline
            for num_mini_batches in divisors:
                rows = batch_size // num_mini_batches
                ppo = 1 if micro is None else max(rows // micro, 1)
                assert train.grad_accum_for(rows) == ppo, (batch_size, micro, num_mini_batches)
                for group in (2, 4, 8):
                    grpo_rows = batch_size * group // num_mini_batches
                    grpo = 1 if micro is None else max(grpo_rows // (micro * group), 1)
                    assert train.grad_accum_for(rows) == grpo, (batch_size, micro, num_mini_batches, group)


def test_grpo_and_ppo_share_the_reward_settings():
    from jrft.config import GRPOConfig, PPOConfig, RewardSettings

    assert issubclass(GRPOConfig, RewardSettings) and issubclass(PPOConfig, RewardSettings)
    for section in ("grpo", "ppo"):
        cfg = load_config(None, [f"{section}.reward_timeout_s=5", f"{section}.log_completions_every=0"])
        assert getattr(cfg, section).reward_timeout_s == 5.0
        with pytest.raises(ConfigError, match=rf"{section}\.reward_timeout_s: must be positive"):
            load_config(None, [f"{section}.reward_timeout_s=0"])


def test_new_loss_options_are_checked():
    with pytest.raises(ConfigError, match=r"grpo\.epsilon_high: with cispo it is the cap eps_max"):
        load_config(None, ["grpo.loss_aggregation=cispo"])
    assert load_config(None, ["grpo.loss_type=cispo", "grpo.epsilon_high=5"]).grpo.epsilon_high == 5.0
    with pytest.raises(ConfigError, match=r"dpo\.label_smoothing: exo_pair needs label_smoothing > 0"):
        load_config(None, ["dpo.loss_type=exo_pair"])
    assert (
        load_config(None, ["dpo.loss_type=exo_pair", "dpo.label_smoothing=1e-3"]).dpo.loss_type == "exo_pair"
    )
    with pytest.raises(ConfigError, match=r"grpo\.reward_std: must be one of"):
        load_config(None, ["grpo.reward_std=n-1"])
