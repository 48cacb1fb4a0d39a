"""``jrft demo``: the smallest real end-to-end run (interim, until the full SFT -> GRPO demo replaces it).

Builds a character tokenizer and a tiny Llama-family model from scratch (no download, no torch), saves both
in transformers' format, loads them back with ``jrft.models.from_pretrained``, checks the logits are equal,
and generates greedily with the KV cache (checked against a full-forward greedy loop). If torch is installed,
also checks that transformers loads the saved directory and gives the same logits.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jrft.data.local_tokenizer import train_tokenizer
from jrft.models import (
    Decoder,
    ModelConfig,
    from_pretrained,
    init_cache,
    positions_from_mask,
    save_pretrained,
)

ALPHABET = "0123456789+=abcdefghijklmnopqrstuvwxyz "
PROMPTS = ("12+34=", "hello world ")


def _config(vocab_size: int) -> ModelConfig:
    return ModelConfig(
        family="llama",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=172,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        hf_extra=(("bos_token_id", "1"), ("eos_token_id", "2"), ("pad_token_id", "0")),
    )


def greedy_with_cache(model: Decoder, tokens: jax.Array, mask: jax.Array, max_new: int) -> jax.Array:
    """Greedy decoding ``[B, P] -> [B, max_new]``: one prefill, then a ``fori_loop`` of single-token steps
    with the cache in the loop carry (a minimal sampler; ``jrft.sampling`` is the real one)."""
    b, p = tokens.shape
    cache = init_cache(model.config, b, p + max_new)
    slots = jnp.zeros((b, p + max_new), jnp.int32).at[:, :p].set(mask)
    positions = positions_from_mask(mask)
    logits, cache = model.forward_with_cache(tokens, positions, cache, 0, slots, last_only=True)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(first)

    def step(i, carry):
        out, cache, slots = carry
        index = p + i - 1
        slots = slots.at[:, index].set(1)
        pos = (positions[:, -1] + i)[:, None]
        last = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)  # [B, 1]
        logits, cache = model.forward_with_cache(last, pos, cache, index, slots)
        return out.at[:, i].set(jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)), cache, slots

    out, _, _ = jax.lax.fori_loop(1, max_new, step, (out, cache, slots))
    return out


def greedy_full_forward(model: Decoder, tokens: np.ndarray, mask: np.ndarray, max_new: int) -> np.ndarray:
    """The same greedy decode by re-running the whole sequence each step (slow, obviously correct). The
    sequence lives in a fixed ``[B, P + max_new]`` buffer (causal attention ignores the right padding), so it
    compiles once."""
    b, p = tokens.shape
    buf = np.concatenate([tokens, np.zeros((b, max_new), np.int32)], axis=1)
    buf_mask = np.concatenate([mask, np.zeros((b, max_new), np.int32)], axis=1)
    forward = jax.jit(lambda m, t, a, i: jnp.argmax(m(t, a)[:, i], axis=-1))
    for i in range(max_new):
        buf[:, p + i] = np.asarray(forward(model, buf, buf_mask, p + i - 1))
        buf_mask[:, p + i] = 1
    return buf[:, p:]


def _transformers_check(path: str, tokens: np.ndarray, mask: np.ndarray, ours: np.ndarray) -> str:
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError:
        return "skipped (torch not installed)"
    from jrft.models.testing import hf_logits

    theirs = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(path).eval(), tokens, mask)
    diff = float(np.abs(theirs - ours)[mask.astype(bool)].max())
    if diff > 1e-4:
        raise SystemExit(f"jrft demo: transformers' logits differ from jrft's by {diff:.2e}")
    return f"max |logit diff| vs transformers = {diff:.1e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jrft demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--max-new", type=int, default=16, help="tokens to generate per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-transformers", action="store_true", help="skip the transformers load check")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    tokenizer = train_tokenizer(alphabet=ALPHABET)
    config = _config(len(tokenizer))
    model = Decoder(config, rngs=nnx.Rngs(args.seed))
    print(
        f"[1/5] built a char tokenizer ({len(tokenizer)} tokens) and a random {config.family} model "
        f"({config.num_params / 1e3:.0f}K params, {config.num_layers} layers, hidden {config.hidden_size})"
    )

    path = save_pretrained(model, os.path.join(args.out, "model"), tokenizer)
    print(f"[2/5] saved in transformers format: {path} ({', '.join(sorted(os.listdir(path)))})")

    loaded = from_pretrained(path)
    batch = tokenizer([tokenizer.bos_token + p for p in PROMPTS], padding=True, padding_side="left")
    tokens = np.asarray(batch["input_ids"], np.int32)
    mask = np.asarray(batch["attention_mask"], np.int32)
    before, after = np.asarray(model(tokens, mask)), np.asarray(loaded(tokens, mask))
    diff = float(np.abs(before - after)[mask.astype(bool)].max())
    if diff != 0.0:
        raise SystemExit(f"jrft demo: reloaded model's logits differ by {diff:.2e}")
    print(f"[3/5] loaded it back with from_pretrained: logits identical (max diff {diff})")

    hf = "skipped" if args.skip_transformers else _transformers_check(path, tokens, mask, after)
    print(f"[4/5] transformers.AutoModelForCausalLM check: {hf}")

    generated = np.asarray(jax.jit(greedy_with_cache, static_argnums=3)(loaded, tokens, mask, args.max_new))
    reference = greedy_full_forward(loaded, tokens, mask, args.max_new)
    if not np.array_equal(generated, reference):
        raise SystemExit("jrft demo: KV-cache greedy decoding disagrees with the full-forward loop")
    print(f"[5/5] greedy generation with the KV cache ({args.max_new} tokens, same as a full-forward loop):")
    for prompt, row in zip(PROMPTS, generated, strict=True):
        print(f"      {prompt!r} -> {tokenizer.decode(row.tolist())!r}  (random weights: gibberish expected)")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0
