"""TRL's extra keyword arguments for reward functions: ``trainer_state``, ``log_metric``, ``log_extra``, in
threads, coroutines and worker processes; what they log reaches the result's metrics and columns."""

from jrft.rewards import RewardRunner
from jrft.rewards.protocol import TrainerState


def trl_style(completions, trainer_state, log_metric, log_extra, **kwargs):
    """A TRL reward function that shapes by training progress and logs."""
    log_metric("progress", trainer_state.global_step / trainer_state.max_steps)
    log_extra("length", [len(c) for c in completions])
    return [float(trainer_state.global_step)] * len(completions)


async def async_logger(completions, log_metric, **kwargs):
    log_metric("progress", 1.0)  # averaged with trl_style's value for this batch
    return [0.0] * len(completions)


def names_only(completions):
    """Declares neither hook nor **kwargs: called without them, as before."""
    return [1.0] * len(completions)


def process_logger(completions, trainer_state, log_metric, log_extra, **kwargs):
    log_metric("worker/epoch", trainer_state.epoch)
    log_extra("worker_tag", [f"w{i}" for i in range(len(completions))])
    return [1.0] * len(completions)


def test_hooks_reach_metrics_and_columns_from_threads_coroutines_and_processes():
    with RewardRunner(
        [trl_style, async_logger, names_only, process_logger], processes=["process_logger"]
    ) as runner:
        runner.set_trainer_state(global_step=3, epoch=0.5, max_steps=6)
        result = runner(prompts=["p", "q"], completions=["ab", "abcd"])
    assert result.per_function["trl_style"].tolist() == [3.0, 3.0]
    assert result.metrics["progress"] == (0.5 + 1.0) / 2
    assert result.metrics["worker/epoch"] == 0.5  # logged inside the worker process, sent back
    assert result.extra == {"length": [2, 4], "worker_tag": ["w0", "w1"]}
    assert not result.errors


def test_trainer_state_defaults_and_bad_extra_columns_are_dropped():
    assert TrainerState().step == 0

    def short_column(completions, log_extra, **kwargs):
        log_extra("bad", [1])  # one value for two completions
        return [0.0, 0.0]

    with RewardRunner([short_column]) as runner:
        result = runner(prompts=["p", "q"], completions=["a", "b"])
    assert result.extra == {} and not result.errors


def test_log_extra_columns_follow_their_rows_through_dynamic_sampling():
    import numpy as np

    from jrft.train.rollout import Rollout, concat_rollouts

    def rollout(n, tag):
        z = np.zeros((n, 3), np.int32)
        return Rollout(
            tokens=z, attention_mask=z, completion_mask=z, sampler_logps=z.astype(np.float32),
            truncated=np.zeros(n, bool), prompt_length=1, prompts=["p"] * n, columns={},
            completions=["c"] * n, completion_ids=[[1]] * n, rewards=np.zeros(n),
            reward_extra={"tag": [f"{tag}{i}" for i in range(n)]},
        )  # fmt: skip

    kept = rollout(4, "a").select_groups(np.array([False, True]), 2)  # the second group of 2
    assert kept.reward_extra["tag"] == ["a2", "a3"]
    assert concat_rollouts([kept, rollout(2, "b")]).reward_extra["tag"] == ["a2", "a3", "b0", "b1"]
