"""Loading user reward functions by spec, signature checks, and the config registry of built-ins."""

import textwrap

import pytest

from jrft.rewards import (
    AccuracyReward,
    RewardLoadError,
    RewardRunner,
    RewardSignatureError,
    build_reward,
    load_reward_function,
    make_builtin,
)

# Written exactly as TRL's documentation writes reward functions: keyword arguments, **kwargs.
TRL_STYLE = textwrap.dedent(
    """
    import re

    def format_reward_func(completions, **kwargs):
        pattern = r"^<think>.*?</think><answer>.*?</answer>$"
        completion_contents = [completion[0]["content"] for completion in completions]
        matches = [re.match(pattern, content) for content in completion_contents]
        return [1.0 if match else 0.0 for match in matches]

    def reward_len(completions, **kwargs):
        return [-abs(20 - len(completion)) for completion in completions]

    def accuracy_with_column(prompts, completions, ground_truth, **kwargs):
        return [1.0 if c.strip() == g else 0.0 for c, g in zip(completions, ground_truth)]

    def uses_ids(completions, completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    def positional_only(completions, /):
        return [0.0] * len(completions)

    def no_completions(prompts):
        return [0.0] * len(prompts)

    def explicit(completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]

    NOT_CALLABLE = 3
    """
)


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(TRL_STYLE)
    return path


def test_load_from_file_and_call_with_trl_contract(user_file):
    fn = load_reward_function(f"{user_file}:reward_len")
    assert fn.__name__ == "reward_len"
    assert fn(prompts=["p"], completions=["x" * 18], completion_ids=[[1]], extra=["col"]) == [-2]
    conv = load_reward_function(f"{user_file}:format_reward_func")
    messages = [[{"role": "assistant", "content": "<think>a</think><answer>b</answer>"}]]
    assert conv(prompts=[[{"role": "user", "content": "q"}]], completions=messages) == [1.0]


def test_load_from_module(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rewards.py").write_text(TRL_STYLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward_function("userpkg.rewards:accuracy_with_column")
    assert fn(prompts=["p", "p"], completions=[" 4", "5"], ground_truth=["4", "4"]) == [1.0, 0.0]
    # a dotted attribute path also works
    assert load_reward_function("jrft.rewards.accuracy:AccuracyReward.__call__")


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("no_colon_here", RewardLoadError, "must look like"),
        ("/does/not/exist.py:f", RewardLoadError, "does not exist"),
        ("surely_missing_module_xyz:f", RewardLoadError, "cannot import module"),
        ("{file}:missing", RewardLoadError, "no attribute 'missing'.*reward_len"),
        ("{file}:NOT_CALLABLE", RewardSignatureError, "not callable"),
        ("{file}:positional_only", RewardSignatureError, "positional-only"),
        ("{file}:no_completions", RewardSignatureError, "must accept 'completions'"),
    ],
)
def test_load_errors_are_clear(user_file, spec, error, message):
    with pytest.raises(error, match=message):
        load_reward_function(spec.format(file=user_file))


def test_broken_file_reports_import_error(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(completions, **kw):\n    return [0.0]\nraise RuntimeError('oops at import')\n")
    with pytest.raises(RewardLoadError, match="oops at import"):
        load_reward_function(f"{bad}:f")


def test_runner_passes_only_declared_arguments(user_file):
    explicit = load_reward_function(f"{user_file}:explicit")
    ids = load_reward_function(f"{user_file}:uses_ids")
    with RewardRunner([explicit, ids], timeout=10) as runner:
        result = runner(
            prompts=["p", "p"], completions=["1", "2"], completion_ids=[[1, 2], [3]], answer=["1", "1"]
        )
    assert result.per_function["explicit"].tolist() == [1.0, 0.0]
    assert result.per_function["uses_ids"].tolist() == [2.0, 1.0]
    assert result.rewards.tolist() == [3.0, 1.0]


def test_registry_builds_builtins_with_options_and_weights(user_file):
    built = build_reward({"name": "accuracy", "weight": 2.5, "tolerance": 0.1, "label": "acc"})
    assert isinstance(built.function, AccuracyReward)
    assert (built.weight, built.label, built.function.tolerance, built.function.name) == (
        2.5,
        "acc",
        0.1,
        "acc",
    )
    user = build_reward({"name": f"{user_file}:reward_len", "process": True})
    assert (user.label, user.process, user.weight) == ("reward_len", True, 1.0)
    assert build_reward("format").function.mode == "strict"


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "acuracy"}, "unknown built-in reward 'acuracy'"),
        ({"name": "accuracy", "tolerence": 1}, r"unknown option\(s\) \['tolerence'\]"),
        ({"name": "accuracy", "tolerance": -1}, "tolerance must be >= 0"),
        ({"name": "accuracy", "weight": "high"}, "weight must be a number"),
        ({"weight": 1.0}, "with a 'name' key"),
    ],
)
def test_registry_errors_name_the_entry(entry, message):
    with pytest.raises(ValueError, match=f"rewards\\[3\\].*{message}|{message}"):
        build_reward(entry, where="rewards[3]")


def test_user_function_options_rejected(user_file):
    with pytest.raises(ValueError, match="takes no options"):
        build_reward({"name": f"{user_file}:reward_len", "scale": 2})
    with pytest.raises(ValueError, match="rewards\\[0\\]"):
        make_builtin("format", {"mode": "loose"}, where="rewards[0]")


def test_trl_functions_run_unchanged_in_the_runner_on_conversational_data(user_file):
    functions = [f"{user_file}:format_reward_func", f"{user_file}:reward_len"]
    prompts = [[{"role": "user", "content": "q"}]] * 2
    completions = [
        [{"role": "assistant", "content": "<think>a</think><answer>b</answer>"}],
        [{"role": "assistant", "content": "no tags"}],
    ]
    with RewardRunner(functions, weights=[1.0, 0.0], timeout=10) as runner:
        result = runner(
            prompts=prompts, completions=completions, completion_ids=[[1], [2]], trainer_state=[0, 0]
        )
    assert result.per_function["format_reward_func"].tolist() == [1.0, 0.0]
    assert result.per_function["reward_len"].tolist() == [-19.0, -19.0]  # len() of a 1-message list
    assert result.rewards.tolist() == [1.0, 0.0]
    assert result.failures == {"format_reward_func": 0, "reward_len": 0}
