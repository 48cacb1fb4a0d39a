"""A reward model that scores with its language model too (``reward.likelihood_coef``): the score is the
scalar head at the last token + c x the completion's summed log-prob, from one trunk forward; the coefficient
travels with the export and every scorer (PPO, reward functions, the demo) applies it."""

import json
import os

import jax
import numpy as np
import pytest

from jrft.models import ModelConfig, from_pretrained
from jrft.models.testing import tiny_hf_config
from jrft.train.objectives import ppo
from jrft.train.objectives.reward import pair_rewards, sequence_rewards
from jrft.train.state import split_model


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@jax.jit
def _logits_and_heads(model, tokens, attention):
    return model(tokens, attention_mask=attention), model.score(tokens, attention_mask=attention)


def _numpy_rewards(model, tokens, attention, completion, coef):
    """head at the last real token + coef x sum over completion tokens t of log p(tokens[t] | tokens[:t])."""
    logits, heads = _logits_and_heads(model, tokens, attention)
    logits, heads = np.asarray(logits, np.float64), np.asarray(heads, np.float64)  # [B, T, V], [B, T]
    logp = _log_softmax(logits)
    out = []
    for b in range(tokens.shape[0]):
        last = np.nonzero(attention[b])[0][-1]
        ll = sum(logp[b, t - 1, tokens[b, t]] for t in range(1, tokens.shape[1]) if completion[b, t])
        out.append(heads[b, last] + coef * ll)
    return np.asarray(out)


@pytest.fixture(scope="module")
def likelihood_model(tiny_task):
    return from_pretrained(tiny_task["model"], scalar_head=True, seed=3, reward_likelihood_coef=0.7)


def _rows():
    """Right- and left-padded rows of different lengths with their completion masks."""
    tokens = np.asarray(
        [[1, 5, 6, 7, 8, 9, 2, 0], [0, 0, 1, 4, 4, 3, 3, 2], [1, 7, 8, 2, 0, 0, 0, 0]], np.int32
    )
    attention = (np.arange(8)[None] < np.asarray([[7], [8], [4]])).astype(np.int32)
    attention[1, :2] = 0
    completion = np.zeros_like(tokens)
    completion[0, 4:7], completion[1, 5:8], completion[2, 2:4] = 1, 1, 1
    return tokens, attention, completion


def _pair_batch(chosen, rejected):
    """A preference batch of :func:`_rows`: the ``chosen`` rows against the ``rejected`` rows."""
    tokens, attention, completion = _rows()
    batch = {}
    for side, rows in (("chosen", chosen), ("rejected", rejected)):
        batch.update({
            f"{side}_tokens": tokens[rows], f"{side}_attention_mask": attention[rows],
            f"{side}_loss_mask": completion[rows],
        })  # fmt: skip
    return batch


def test_score_is_head_plus_coef_times_completion_logprob(likelihood_model):
    tokens, attention, completion = _rows()
    want = _numpy_rewards(likelihood_model, tokens, attention, completion, 0.7)
    got = sequence_rewards(likelihood_model, tokens, attention, completion_mask=completion)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    chunked = sequence_rewards(
        likelihood_model, tokens, attention, completion_mask=completion, logits_chunk_size=3
    )
    np.testing.assert_allclose(chunked, want, rtol=1e-5, atol=1e-5)
    # the likelihood term is really there: the head alone differs
    head_only = _numpy_rewards(likelihood_model, tokens, attention, completion, 0.0)
    assert np.min(np.abs(head_only - want)) > 0.1
    with pytest.raises(ValueError, match="needs a completion_mask"):
        sequence_rewards(likelihood_model, tokens, attention)


def test_head_only_model_ignores_the_completion_mask(tiny_task):
    model = from_pretrained(tiny_task["model"], scalar_head=True, seed=3)
    assert model.config.reward_likelihood_coef == 0.0
    tokens, attention, completion = _rows()
    np.testing.assert_allclose(
        sequence_rewards(model, tokens, attention, completion_mask=completion),
        _numpy_rewards(model, tokens, attention, completion, 0.0),
        rtol=1e-5,
        atol=1e-5,
    )


def test_pair_rewards_and_ppo_scores_use_each_rows_completion(likelihood_model):
    tokens, attention, completion = _rows()
    want = _numpy_rewards(likelihood_model, tokens, attention, completion, 0.7)
    batch = _pair_batch(slice(0, 2), slice(1, 3))
    chosen, rejected = pair_rewards(likelihood_model, batch)
    np.testing.assert_allclose(chosen, want[:2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rejected, want[1:], rtol=1e-5, atol=1e-5)
    graphdef, params, rest = split_model(likelihood_model)
    score = ppo.make_score_fn(graphdef, logits_chunk_size=4)(
        params, rest, {"tokens": tokens, "attention_mask": attention, "completion_mask": completion}
    )
    np.testing.assert_allclose(score, want, rtol=1e-5, atol=1e-5)


def test_the_coefficient_is_saved_in_config_json():
    base = ModelConfig.from_hf(tiny_hf_config("llama"))
    assert "jrft_reward_likelihood_coef" not in base.to_hf()  # absent when 0: plain transformers configs
    hf = base.replace(reward_likelihood_coef=0.25).to_hf()
    assert hf["jrft_reward_likelihood_coef"] == 0.25
    assert ModelConfig.from_hf(hf).reward_likelihood_coef == 0.25
    assert "jrft_reward_likelihood_coef" not in dict(ModelConfig.from_hf(hf).hf_extra)  # modelled
    with pytest.raises(ValueError, match="reward_likelihood_coef must be >= 0"):
        base.replace(reward_likelihood_coef=-1.0)


def test_saved_reward_model_scores_with_its_coefficient_everywhere(tiny_task, tmp_path):
    """A reward model saved with the coefficient (``jrft reward`` exports it so: test_train_ppo) keeps it in
    config.json; the reward-function wrapper and the demo's scorer give the hand-computed score of
    [bos] prompt completion [eos]."""
    from transformers import AutoTokenizer

    from jrft.demo.evaluate import reward_scores
    from jrft.models import save_pretrained
    from jrft.train.reward_model_fn import load_reward_model_function

    saved = from_pretrained(tiny_task["model"], scalar_head=True, seed=3, reward_likelihood_coef=0.5)
    path = str(save_pretrained(saved, tmp_path / "rm", AutoTokenizer.from_pretrained(tiny_task["model"])))
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["jrft_reward_likelihood_coef"] == 0.5
    model = from_pretrained(path, scalar_head=True)
    assert model.config.reward_likelihood_coef == 0.5
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts, completions = ["12+34=", "5+6="], ["46", "11"]
    tokens, attention, completion = [], [], []
    for p, c in zip(prompts, completions, strict=True):
        ids = tokenizer([p, c], add_special_tokens=False)["input_ids"]
        head, tail = [tokenizer.bos_token_id, *ids[0]], [*ids[1], tokenizer.eos_token_id]
        row = np.zeros(12, np.int32)
        row[: len(head) + len(tail)] = head + tail
        tokens.append(row)
        attention.append((np.arange(12) < len(head) + len(tail)).astype(np.int32))
        completion.append(
            ((np.arange(12) >= len(head)) & (np.arange(12) < len(head) + len(tail))).astype(np.int32)
        )
    tokens, attention, completion = map(np.stack, (tokens, attention, completion))
    want = _numpy_rewards(model, tokens, attention, completion, 0.5)
    fn = load_reward_model_function(path)
    np.testing.assert_allclose(fn(prompts=prompts, completions=completions), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        reward_scores(model, tokenizer, prompts, completions), want, rtol=1e-5, atol=1e-5
    )


def test_sft_coef_adds_the_chosen_answers_mean_token_nll(likelihood_model):
    """loss = mean over real pairs of [-log sigmoid(r_c - r_r) + sft_coef x mean NLL of chosen's tokens]."""
    from jrft.train.objectives.reward import make_loss_fn

    tokens, attention, completion = _rows()
    batch = _pair_batch([0, 2, 1], [1, 0, 2])
    rewards = _numpy_rewards(likelihood_model, tokens, attention, completion, 0.7)
    likelihood = (_numpy_rewards(likelihood_model, tokens, attention, completion, 1.0)
                  - _numpy_rewards(likelihood_model, tokens, attention, completion, 0.0))  # fmt: skip
    nll = -likelihood / completion[:, 1:].sum(-1)
    bt = np.log1p(np.exp(-(rewards[[0, 2, 1]] - rewards[[1, 0, 2]])))
    norms = {"pairs": 3.0}
    loss, metrics = make_loss_fn(sft_coef=0.3)(likelihood_model, batch, norms, None)
    np.testing.assert_allclose(loss, np.mean(bt + 0.3 * nll[[0, 2, 1]]), rtol=1e-5)
    np.testing.assert_allclose(metrics["nll_chosen"], np.mean(nll[[0, 2, 1]]), rtol=1e-5)
    plain, _ = make_loss_fn()(likelihood_model, batch, norms, None)
    np.testing.assert_allclose(plain, np.mean(bt), rtol=1e-5)


def test_row_completion_mask_zeroes_the_prompt_slots():
    from jrft.train.rollout import Rollout

    completion = np.asarray([[1, 1, 0], [1, 0, 0]], np.int32)
    rollout = Rollout(
        tokens=np.zeros((2, 5), np.int32),
        attention_mask=np.ones((2, 5), np.int32),
        completion_mask=completion,
        sampler_logps=np.zeros((2, 3), np.float32),
        truncated=np.zeros(2, bool),
        prompt_length=2,
        prompts=["a", "b"],
        columns={},
        completions=["", ""],
        completion_ids=[[], []],
    )
    np.testing.assert_array_equal(rollout.row_completion_mask(), [[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]])
