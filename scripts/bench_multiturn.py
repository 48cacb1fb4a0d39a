"""Benchmark: multi-turn rollout (jrft.agentic) vs single-turn rollout tokens/s on the same model.

Not a test. Run on an otherwise idle machine:

    .venv/bin/python scripts/bench_multiturn.py            # 8 prompts x G=4, budget 256, 4 turns
    .venv/bin/python scripts/bench_multiturn.py --tiny     # a seconds-long smoke run

A random Llama (char tokenizer, so turns end at EOS after ~vocab tokens on average) samples 32 rows with
a budget of ``--budget`` continuation tokens: once as one turn (``jrft.sampling.generate``, what a
single-turn GRPO rollout does) and once as up to ``--turns`` turns against an environment that answers every
turn with a short user message (``jrft.agentic.rollout.sample_multiturn``). The multi-turn rollout runs twice:
continuing from its KV cache (``kv_cache=True``, ``jrft.sampling.session``) and re-prefilling every row's
whole sequence each turn (``kv_cache=False``). Reported: model-sampled tokens per second (environment tokens
not counted), median of interleaved repeats after two warm-up calls (compiles), compiles inside the timed
calls. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np
from flax import nnx

from jrft.agentic.rollout import AgentSettings, encode, render, sample_multiturn
from jrft.data.local_tokenizer import DEFAULT_SPECIAL_TOKENS, train_tokenizer
from jrft.models import Decoder, ModelConfig
from jrft.models.testing import tiny_hf_config
from jrft.sampling import generate
from jrft.sampling.generate import DEFAULT_SAMPLER
from jrft.sampling.session import Session
from jrft.train.rollout import SamplingSettings

ALPHABET = '0123456789+-*=,.{}[]":abcdefghijklmnopqrstuvwxyz _'


class Echo:
    """Answers every turn with 'go on' (a user message), for as many turns as the rollout allows."""

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, text):
        return [{"role": "user", "content": "go on"}], None, False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--g", type=int, default=4)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tok = train_tokenizer(
        kind="char", alphabet=ALPHABET, special_tokens=(*DEFAULT_SPECIAL_TOKENS, "<|tool|>")
    )
    size = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    if not args.tiny:
        size = dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=4)
    cfg = tiny_hf_config(
        "llama",
        vocab_size=len(tok),
        num_hidden_layers=2 if args.tiny else 4,
        head_dim=32 if not args.tiny else 16,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **size,
    )
    model = Decoder(ModelConfig.from_hf(cfg), rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    prompts = [f"{a}*{b}=" for a, b in zip(range(11, 99, 7), range(23, 99, 5), strict=False)][: args.prompts]
    batch = {"prompts": prompts, "columns": {}}
    settings = SamplingSettings(args.g, args.budget, 1.0, None, None, tok.pad_token_id)
    agents = {
        "multi_kv": AgentSettings(Echo, max_turns=args.turns, kv_cache=True),
        "multi_reprefill": AgentSettings(Echo, max_turns=args.turns, kv_cache=False),
    }
    user = [[{"role": "user", "content": p}] for p in prompts]
    ids = [encode(tok, render(tok, m, None, add_generation_prompt=True)) for m in user]
    width = max(len(x) for x in ids)
    prompt_tokens = np.full((len(ids), width), tok.pad_token_id, np.int32)
    prompt_mask = np.zeros_like(prompt_tokens)
    for i, x in enumerate(ids):
        prompt_tokens[i, width - len(x) :], prompt_mask[i, width - len(x) :] = x, 1

    def single(seed):
        out = generate(
            model,
            prompt_tokens,
            prompt_mask,
            max_new_tokens=args.budget,
            num_samples=args.g,
            temperature=1.0,
            stop_token_ids=[tok.eos_token_id],
            rng=seed,
            pad_token_id=tok.pad_token_id,
        )
        return int(np.asarray(out.lengths).sum()), 1

    def multi(agent):
        def run(seed):
            r = sample_multiturn(model, batch, tok, settings, agent, rng=jax.random.key(seed))
            return int(r.completion_mask.sum()), max(len(t) for t in r.turns)

        return run

    def compiled() -> int:  # programs compiled so far: generate's and the KV session's
        return DEFAULT_SAMPLER.stats.compiles + Session._program(jax.devices()[0].platform)._cache_size()

    fns = {"single": single, **{name: multi(agent) for name, agent in agents.items()}}
    results = {name: [] for name in fns}
    info = {}
    for name, fn in fns.items():
        compiles = compiled()
        t0 = time.perf_counter()
        fn(100)
        fn(101)  # a second warm-up: more of the shape buckets a multi-turn rollout meets
        info[name] = {
            "warmup_s": time.perf_counter() - t0,
            "compiles": compiled() - compiles,
        }
    for rep in range(args.repeats):
        for name, fn in fns.items():
            compiles = compiled()
            t0 = time.perf_counter()
            tokens, calls = fn(rep)
            dt = time.perf_counter() - t0
            results[name].append((tokens / dt, tokens, calls, dt, compiled() - compiles))
    summary = {
        "params": int(n_params),
        "rows": args.prompts * args.g,
        "budget": args.budget,
        "turns": args.turns,
    }
    for name, rows in results.items():
        med = statistics.median(r[0] for r in rows)
        summary[name] = {
            "tokens_per_s": round(med, 1),
            "tokens": [r[1] for r in rows],
            "turns": rows[0][2],
            "seconds": [round(r[3], 2) for r in rows],
            "timed_compiles": [r[4] for r in rows],  # compiles inside timed calls (new shape buckets)
            **{k: round(v, 2) for k, v in info[name].items()},
        }
        print(
            f"{name:>16}: {med:8.1f} model tok/s  (tokens {summary[name]['tokens']}, turns {rows[0][2]}, "
            f"warm-up {info[name]['warmup_s']:.1f} s, timed compiles {summary[name]['timed_compiles']})"
        )
    for name in agents:
        summary[f"ratio_{name}_over_single"] = round(
            summary[name]["tokens_per_s"] / summary["single"]["tokens_per_s"], 3
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
