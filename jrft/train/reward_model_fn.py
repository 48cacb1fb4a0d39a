"""A trained reward model as a reward function (TRL's contract): GRPO's and PPO's ``reward_functions`` can
hold ``{reward_model: path, weight: w}`` next to rule-based functions.

The model is a jrft reward model (``jrft reward`` export) or a transformers ``...ForSequenceClassification``
with one label, loaded with its scalar head; its score is the head at the last real token of ``prompt +
completion`` tokenized with the reward model's own tokenizer (its chat template for conversations;
``[bos] prompt completion [eos]`` for text, as ``jrft reward`` trained it), plus, for a reward model saved
with ``jrft_reward_likelihood_coef`` (``reward.likelihood_coef``), that times the completion's log-prob. It
runs on the device, in a thread of the reward runner (never a worker process: it holds device arrays).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jrft.data.batching import bucket_length
from jrft.data.chat import encode_chat
from jrft.train.objectives.ppo import make_score_fn
from jrft.train.placement import device_batch
from jrft.train.reference import FrozenModel
from jrft.train.state import split_model


class RewardModelFunction:
    """``f(prompts=..., completions=..., **_) -> [N] floats`` scoring with a reward model on ``mesh``.

    Args:
      model: a ``jrft.models.Decoder`` with a scalar head (``from_pretrained(..., scalar_head=True)``).
      tokenizer: the reward model's tokenizer.
      mesh: where the model lives (rows are sharded over its batch axes); None: the default device.
      name: the function's name in metrics (``rewards/{name}/mean``).
      buckets: padded lengths (few shapes, few compilations).
    """

    def __init__(self, model, tokenizer, *, mesh=None, name: str = "reward_model", buckets: int = 64):
        graphdef, params, rest = split_model(model)
        self.frozen = FrozenModel(params, rest, copy=False)
        self.score_fn = make_score_fn(graphdef)
        self.tokenizer, self.mesh, self.name, self.buckets = tokenizer, mesh, name, buckets
        bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
        self.bos, self.eos = ([] if bos is None else [int(bos)]), ([] if eos is None else [int(eos)])
        self.pad = int(getattr(tokenizer, "pad_token_id", None) or (eos if eos is not None else 0))

    def _ids(self, prompt: Any, completion: Any) -> tuple[list[int], list[int]]:
        """Token ids of the row and its completion mask (1 on the completion's tokens, eos included)."""
        if isinstance(prompt, list):  # a conversation: the reward model's chat template
            messages = prompt + (completion if isinstance(completion, list) else [
                {"role": "assistant", "content": completion}
            ])  # fmt: skip
            tokens, trained = encode_chat(self.tokenizer, messages, first_trained=len(prompt))
            return [int(t) for t in tokens], [int(m) for m in trained]
        text = completion if isinstance(completion, str) else str(completion)
        ids = self.tokenizer([prompt, text], add_special_tokens=False)["input_ids"]
        head, tail = self.bos + list(ids[0]), list(ids[1]) + self.eos
        return head + tail, [0] * len(head) + [1] * len(tail)

    def __call__(self, *, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        rows = [self._ids(p, c) for p, c in zip(prompts, completions, strict=True)]
        length = bucket_length(max(len(r) for r, _ in rows), self.buckets)
        tokens = np.full((len(rows), length), self.pad, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        completion = np.zeros((len(rows), length), np.int32)
        for i, (r, c) in enumerate(rows):
            tokens[i, : len(r)], mask[i, : len(r)], completion[i, : len(c)] = r, 1, c
        host = {"tokens": tokens, "attention_mask": mask, "completion_mask": completion}
        if self.mesh is None:
            scores = self.frozen.call(self.score_fn, host)
        else:
            with jax.set_mesh(self.mesh):
                scores = self.frozen.call(self.score_fn, device_batch(host, self.mesh))
        return np.asarray(jax.device_get(scores), np.float64).tolist()


def load_reward_model_function(path: str, *, mesh=None, dtype: str = "float32", name: str = "reward_model"):
    """A :class:`RewardModelFunction` from a reward-model directory (config.json, safetensors, tokenizer)."""
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from jrft.models import from_pretrained

    model = from_pretrained(path, mesh=mesh, dtype=jnp.dtype(dtype), scalar_head=True)
    return RewardModelFunction(model, AutoTokenizer.from_pretrained(path), mesh=mesh, name=name)
