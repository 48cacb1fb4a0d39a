"""A trained reward model as one of GRPO's / PPO's reward functions (``{reward_model: path}``)."""

import numpy as np
import pytest

from jrft.config import ConfigError, load_config
from jrft.models import from_pretrained, save_pretrained
from jrft.train.objectives.reward import sequence_rewards
from jrft.train.runs.setup import reward_runner_from_config


@pytest.fixture(scope="module")
def reward_model_dir(tiny_task, tmp_path_factory):
    """The tiny task's model with a scalar head, saved as a sequence-classification reward model."""
    from transformers import AutoTokenizer

    model = from_pretrained(tiny_task["model"], scalar_head=True, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_task["model"])
    return str(save_pretrained(model, tmp_path_factory.mktemp("rm") / "rm", tokenizer)), tokenizer


def test_reward_model_entry_scores_prompt_plus_completion(tiny_task, reward_model_dir, tmp_path):
    path, tokenizer = reward_model_dir
    rewards = tmp_path / "r.py"
    rewards.write_text("def zero(completions, **kw):\n    return [0.0] * len(completions)\n")
    cfg = load_config(
        None,
        [
            "objective=grpo",
            f"grpo.reward_functions=[{{reward_model: '{path}', weight: 0.5, label: rm}}, "
            f"{{spec: '{rewards}:zero'}}]",
        ],
    )
    prompts, completions = ["12+34=", "5+6=", "7+8="], ["46", "11<eos>", "99999"]
    with reward_runner_from_config(cfg.grpo, group_size=1, max_new_tokens=8) as runner:
        result = runner(prompts=prompts, completions=completions)
    assert runner.names == ["rm", "zero"] and not result.errors
    # The same scores by hand: [bos] prompt completion [eos], the head at the last real token.
    model = from_pretrained(path, scalar_head=True)
    want = []
    for p, c in zip(prompts, completions, strict=True):
        ids = tokenizer([p, c], add_special_tokens=False)["input_ids"]
        row = [tokenizer.bos_token_id, *ids[0], *ids[1], tokenizer.eos_token_id]
        tokens = np.asarray([row], np.int32)
        want.append(float(sequence_rewards(model, tokens, np.ones_like(tokens))[0]))
    np.testing.assert_allclose(result.per_function["rm"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.rewards, 0.5 * np.asarray(want), rtol=1e-5, atol=1e-6)


def test_reward_model_entry_is_checked():
    with pytest.raises(ConfigError, match=r"exactly one of 'name', 'spec' or 'reward_model'"):
        load_config(None, ["grpo.reward_functions=[{name: format, reward_model: rm}]"])
    with pytest.raises(ConfigError, match=r"reward model runs on the device"):
        load_config(None, ["grpo.reward_functions=[{reward_model: rm, process: true}]"])
