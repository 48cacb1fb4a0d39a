"""RewardRunner: faults isolated and counted, fail_fast, weights, both combination modes, async, processes."""

import asyncio
import logging
import math
import os
import time

import numpy as np
import pytest

from jrft.rewards import RewardFunctionError, RewardRunner, group_normalize

PROMPTS = ["p0", "p0", "p1", "p1"]
COMPLETIONS = ["a", "bb", "ccc", "dddd"]


# Module-level so worker processes can unpickle them by reference (this module is importable there).
def length(completions, **kwargs):
    return [float(len(c)) for c in completions]


def raises(completions, **kwargs):
    raise ValueError("deliberate failure")


def sleeps(completions, **kwargs):
    time.sleep(30)
    return [1.0] * len(completions)


def returns_nan(completions, **kwargs):
    return [math.nan, 1.0, float("inf"), 2.0]


def wrong_length(completions, **kwargs):
    return [1.0]


def not_a_list(completions, **kwargs):
    return 1.0


def bad_element(completions, **kwargs):
    return ["x", 1, np.bool_(True), None]


def exits_process(completions, **kwargs):
    os._exit(3)


def pid(completions, **kwargs):
    return [float(os.getpid())] * len(completions)


def run(runner, **columns):
    return runner(prompts=PROMPTS, completions=COMPLETIONS, **columns)


# ------------------------------------------------------------------ faults


def test_faults_become_none_counted_and_logged(caplog):
    functions = [length, raises, returns_nan, wrong_length, not_a_list, bad_element]
    with (
        caplog.at_level(logging.WARNING, logger="jrft.rewards"),
        RewardRunner(functions, timeout=10) as runner,
    ):
        result = run(runner)
    assert result.failures == {
        "length": 0,
        "raises": 4,
        "returns_nan": 2,
        "wrong_length": 4,
        "not_a_list": 4,
        "bad_element": 1,  # "x" fails; 1 and True are numbers; None is "not applicable", not a failure
    }
    np.testing.assert_array_equal(result.per_function["length"], [1, 2, 3, 4])
    np.testing.assert_array_equal(result.per_function["returns_nan"], [np.nan, 1, np.nan, 2])
    np.testing.assert_array_equal(result.per_function["bad_element"], [np.nan, 1, 1, np.nan])
    assert (
        np.isnan(result.per_function["raises"]).all() and np.isnan(result.per_function["wrong_length"]).all()
    )
    np.testing.assert_array_equal(result.rewards, [1, 4, 4, 6])  # length + nan-skipped others
    assert (
        "deliberate failure" in result.errors["raises"] and "1 values for 4" in result.errors["wrong_length"]
    )
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert (
        "'raises' failed for 4/4 completions: ValueError: deliberate failure; example completion: 'a'"
        in logged
    )
    assert result.metrics["rewards/raises/failures"] == 4.0


def test_hanging_thread_is_abandoned_and_runner_returns_on_time(caplog):
    with (
        caplog.at_level(logging.WARNING, logger="jrft.rewards"),
        RewardRunner([length, sleeps], timeout=1.0) as runner,
    ):
        start = time.monotonic()
        result = run(runner)
        elapsed = time.monotonic() - start
    assert elapsed < 2.5
    assert result.failures == {"length": 0, "sleeps": 4}
    assert "TimeoutError" in result.errors["sleeps"]
    assert runner.abandoned_threads == 1
    assert "abandoned" in caplog.text
    np.testing.assert_array_equal(result.rewards, [1, 2, 3, 4])


def test_missing_column_is_a_failure_naming_the_column():
    def needs_answer(completions, answer):
        return [1.0] * len(completions)

    with RewardRunner([needs_answer, length], timeout=10) as runner:
        result = run(runner, solution=["1"] * 4)
    assert result.failures["needs_answer"] == 4
    assert "'answer' is not a dataset column" in result.errors["needs_answer"]


@pytest.mark.parametrize("fn, timeout", [(raises, 10), (returns_nan, 10), (wrong_length, 10), (sleeps, 0.5)])
def test_fail_fast_raises_with_the_function_name(fn, timeout):
    with RewardRunner([length, fn], timeout=timeout, fail_fast=True) as runner:
        with pytest.raises(RewardFunctionError, match=f"reward function '{fn.__name__}'"):
            run(runner)


def test_batch_shape_errors():
    with RewardRunner([length], timeout=10, group_size=3) as runner:
        with pytest.raises(ValueError, match="not a multiple of group_size 3"):
            run(runner)
    with RewardRunner([length], timeout=10) as runner:
        with pytest.raises(ValueError, match="'answer' has 3 entries for 4 completions"):
            run(runner, answer=[1, 2, 3])
    with pytest.raises(ValueError, match="group_size is required"):
        RewardRunner([length], combine="normalize_then_sum")
    with pytest.raises(ValueError, match="weights"):
        RewardRunner([length], weights=[1.0, 2.0])


# ------------------------------------------------------------------ weights and combination


def const(values, name):
    def fn(completions, **kwargs):
        return list(values)

    fn.__name__ = name
    return fn


F1 = const([1.0, 0.0, 1.0, 1.0], "f1")
F2 = const([10.0, 20.0, 30.0, None], "f2")


def test_sum_then_normalize_weighted_sum_by_hand():
    with RewardRunner([F1, F2], weights=[1.0, 0.5], timeout=10, group_size=2) as runner:
        result = run(runner)
    # 1*f1 + 0.5*f2, the None skipped: [1+5, 0+10, 1+15, 1]
    np.testing.assert_allclose(result.rewards, [6.0, 10.0, 16.0, 1.0])
    np.testing.assert_array_equal(result.per_function["f2"], [10, 20, 30, np.nan])
    assert result.metrics["rewards/f2/frac_none"] == 0.25
    assert result.metrics["rewards/f2/mean"] == 20.0
    assert result.metrics["rewards/f2/std"] == pytest.approx(np.std([10, 20, 30]))
    assert result.metrics["rewards/frac_zero_std_groups"] == 0.0
    assert result.metrics["rewards/f1/seconds"] >= 0.0


def test_normalize_then_sum_gdpo_by_hand():
    eps = 1e-6
    with RewardRunner(
        [F1, F2], weights=[1.0, 0.5], timeout=10, group_size=2, combine="normalize_then_sum"
    ) as r:
        result = run(r)
    # f1 groups: [1, 0] -> mean .5, std .5 -> [+1, -1]; [1, 1] -> std 0 -> [0, 0]
    # f2 groups: [10, 20] -> mean 15, std 5 -> [-1, +1]; [30, None] -> [0, NaN]
    a, b = 0.5 / (0.5 + eps), 5 / (5 + eps)
    np.testing.assert_allclose(result.rewards, [a - 0.5 * b, -a + 0.5 * b, 0.0, 0.0], atol=1e-12)
    # raw values are reported unnormalised
    np.testing.assert_array_equal(result.per_function["f1"], [1, 0, 1, 1])


def test_combined_reward_nan_only_where_nothing_applied():
    none = const([None, None, None, None], "none")
    partial = const([None, 2.0, None, None], "partial")
    with RewardRunner([none, partial], timeout=10, group_size=2) as runner:
        result = run(runner)
    np.testing.assert_array_equal(result.rewards, [np.nan, 2.0, np.nan, np.nan])
    assert result.metrics["rewards/frac_nan"] == 0.75
    assert result.failures == {"none": 0, "partial": 0}
    assert result.metrics["rewards/frac_zero_std_groups"] == 1.0  # no group has two different rewards


def test_group_normalize_matches_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 12))
    got = group_normalize(x, 4, eps=1e-6)
    g = x.reshape(3, 3, 4)
    ref = ((g - g.mean(-1, keepdims=True)) / (g.std(-1, keepdims=True) + 1e-6)).reshape(3, 12)
    np.testing.assert_allclose(got, ref)


def test_functions_cannot_disturb_each_others_arguments():
    def mutates(completions, **kwargs):
        completions[:] = ["zzzzzzzzzz"] * len(completions)
        return [0.0] * len(completions)

    def reads_late(completions, **kwargs):
        time.sleep(0.2)
        return [float(len(c)) for c in completions]

    with RewardRunner([mutates, reads_late], timeout=10) as runner:
        result = run(runner)
    np.testing.assert_array_equal(result.per_function["reads_late"], [1, 2, 3, 4])
    assert COMPLETIONS == ["a", "bb", "ccc", "dddd"]


def test_duplicate_names_get_suffixes():
    with RewardRunner([length, length, "format"], timeout=10) as runner:
        assert runner.names == ["length", "length_2", "format"]


# ------------------------------------------------------------------ concurrency: threads and async


def test_sync_functions_run_concurrently():
    def slow_a(completions, **kwargs):
        time.sleep(0.6)
        return [1.0] * len(completions)

    def slow_b(completions, **kwargs):
        time.sleep(0.6)
        return [2.0] * len(completions)

    with RewardRunner([slow_a, slow_b], timeout=10) as runner:
        start = time.monotonic()
        result = run(runner)
        assert time.monotonic() - start < 1.1
    np.testing.assert_array_equal(result.rewards, [3.0] * 4)


def test_async_functions_awaited_concurrently_and_timed_out():
    async def a1(completions, **kwargs):
        await asyncio.sleep(0.6)
        return [1.0] * len(completions)

    async def a2(completions, **kwargs):
        await asyncio.sleep(0.6)
        return [0.5] * len(completions)

    async def a_hangs(completions, **kwargs):
        await asyncio.sleep(30)
        return [0.0] * len(completions)

    with RewardRunner([a1, a2], timeout=10) as runner:
        start = time.monotonic()
        result = run(runner)
        assert time.monotonic() - start < 1.1
    np.testing.assert_array_equal(result.rewards, [1.5] * 4)
    with RewardRunner([a1, a_hangs], timeout=1.0) as runner:
        start = time.monotonic()
        result = run(runner)
        assert time.monotonic() - start < 2.5
    assert result.failures == {"a1": 0, "a_hangs": 4}
    assert runner.abandoned_threads == 0  # cancelled coroutines leave nothing running


# ------------------------------------------------------------------ process pool


def test_process_pool_kills_hung_worker_and_replaces_it():
    with RewardRunner([length, sleeps, pid], timeout=1.5, processes=True) as runner:
        first_pid = run(runner).per_function["pid"][0]
        start = time.monotonic()
        result = run(runner)
        assert time.monotonic() - start < 4.0
        assert result.failures == {"length": 0, "sleeps": 4, "pid": 0}
        assert "killed" in result.errors["sleeps"]
        assert runner._pool.replaced == 2  # one per batch
        assert runner.abandoned_threads == 0
        # workers really are other processes, and the pool keeps working after replacements
        assert first_pid != os.getpid()
        np.testing.assert_array_equal(run(runner).per_function["length"], [1, 2, 3, 4])


def test_process_pool_with_function_from_file_and_crashing_worker(tmp_path):
    path = tmp_path / "file_rewards.py"
    source = (
        "import os\ndef from_file(completions, **kw):\n    return [float(os.getpid())] * len(completions)\n"
    )
    path.write_text(source)
    spec = f"{path}:from_file"
    with RewardRunner([spec, exits_process], timeout=10, processes=True) as runner:
        result = run(runner)
        assert result.failures == {"from_file": 0, "exits_process": 4}
        assert "WorkerCrashed" in result.errors["exits_process"]
        assert result.per_function["from_file"][0] != os.getpid()
        assert run(runner).failures["from_file"] == 0  # still fine after the crash


def test_process_pool_rejects_unpicklable_function():
    local = const([1.0] * 4, "local_closure")
    with pytest.raises(ValueError, match="'local_closure' cannot be sent to a worker process"):
        RewardRunner([local], processes=["local_closure"])
    with pytest.raises(ValueError, match="unknown function name"):
        RewardRunner([length], processes=["nope"])


def test_from_config_builds_everything(tmp_path):
    path = tmp_path / "cfg_rewards.py"
    path.write_text(
        "def shout(completions, **kwargs):\n    return [float(c.isupper()) for c in completions]\n"
    )
    entries = [
        {"name": "accuracy", "weight": 2.0, "symbolic": False},
        "format",
        {"name": f"{path}:shout", "weight": 0.5, "process": True, "label": "caps"},
    ]
    with RewardRunner.from_config(entries, timeout=10, group_size=2) as runner:
        assert runner.names == ["accuracy", "format", "caps"]
        result = runner(
            prompts=PROMPTS,
            completions=["<think>x</think><answer>4</answer>", "5", "SHOUT 4", "<answer>9</answer>"],
            answer=["4", "4", "4", "4"],
        )
    # accuracy*2 + format + caps*0.5
    np.testing.assert_allclose(result.rewards, [2 + 1 + 0, 0, 2 + 0 + 0.5, 0])
