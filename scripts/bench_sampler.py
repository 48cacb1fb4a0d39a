"""Benchmark: jrft.sampling.generate vs transformers ``generate`` (PyTorch, CPU, use_cache), greedy, on the
same ~25M-parameter Llama (identical weights: built with transformers, saved, loaded by jrft).

Not a test. Run on an otherwise idle machine (shared/NOTES.md: a second busy process ruins every figure):

    .venv/bin/python scripts/bench_sampler.py                 # batch 32 and 128, 16-token prompts, 128 new
    .venv/bin/python scripts/bench_sampler.py --tiny          # a seconds-long smoke run
    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false .venv/bin/python scripts/bench_sampler.py   # a process flag

Prints, per batch size: tokens/s of each side (median over interleaved repeats) and the ratio, jrft's
compile time (first call minus a steady call) and compile count, the fraction of the FLOP floor reached by
each side (floor = 2 x params x generated tokens / the FLOP/s of a large fp32 matmul measured in this run,
per framework), whether the greedy tokens agree, and the KV-cache memory formula
2 x L x B x KV x S x Dh x bytes. The last line is the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch: stable timings beside another process (NOTES.md)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from jrft.models import from_pretrained  # noqa: E402
from jrft.sampling import Sampler, bucket_length, generate  # noqa: E402

FULL = dict(
    vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8
)
FULL.update(num_key_value_heads=4, head_dim=64)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TINY.update(num_key_value_heads=2, head_dim=16)


def build_checkpoint(shape: dict, directory: str, seed: int = 0) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        **shape, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=None
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.save_pretrained(directory)
    return model


def matmul_flops_jax(n: int) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def matmul_flops_torch(n: int) -> float:
    a = torch.randn(n, n)
    a @ a
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def run_hf(model, prompts: np.ndarray, new: int) -> tuple[float, np.ndarray]:
    ids = torch.as_tensor(prompts, dtype=torch.long)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            eos_token_id=None,
        )
    return time.perf_counter() - t0, out[:, prompts.shape[1] :].numpy()


def run_jrft(model, prompts: np.ndarray, new: int, sampler: Sampler, args) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    res = generate(
        model,
        prompts,
        None,
        max_new_tokens=new,
        temperature=0.0,
        sampler=sampler,
        cache_dtype=args.cache_dtype,
        layout=args.layout,
    )
    tokens = np.asarray(res.tokens)  # blocks until done
    return time.perf_counter() - t0, tokens


def bench_batch(hf, model, params: int, batch: int, args, flops: dict) -> dict:
    rng = np.random.default_rng(batch)
    prompts = rng.integers(3, hf.config.vocab_size, (batch, args.prompt_len)).astype(np.int32)
    sampler = Sampler(compiler_options=args.xla_options)
    first, _ = run_jrft(model, prompts, args.new, sampler, args)
    run_hf(hf, prompts, args.new)  # warm-up
    t_hf, t_jrft = [], []
    for _ in range(args.repeats):  # interleaved
        t, hf_tokens = run_hf(hf, prompts, args.new)
        t_hf.append(t)
        t, jrft_tokens = run_jrft(model, prompts, args.new, sampler, args)
        t_jrft.append(t)
    tokens = batch * args.new
    med_hf, med_jrft = statistics.median(t_hf), statistics.median(t_jrft)
    floor_flops = 2 * params * tokens
    cfg = model.config
    s_len = args.prompt_len + args.new
    bytes_per = jnp.dtype(args.cache_dtype or model.dtype).itemsize
    kv = 2 * cfg.num_layers * batch * cfg.num_kv_heads * s_len * cfg.head_dim * bytes_per
    s_bucket = bucket_length(args.prompt_len) + bucket_length(args.new, 32)
    return {
        "batch": batch,
        "hf_tok_s": tokens / med_hf,
        "jrft_tok_s": tokens / med_jrft,
        "ratio": med_hf / med_jrft,
        "hf_s": t_hf,
        "jrft_s": t_jrft,
        "jrft_compile_s": max(0.0, first - med_jrft),
        "jrft_compiles": sampler.stats.compiles,
        "hf_floor_fraction": floor_flops / flops["torch"] / med_hf,
        "jrft_floor_fraction": floor_flops / flops["jax"] / med_jrft,
        "greedy_tokens_equal_fraction": float(np.mean(hf_tokens == jrft_tokens)),
        "kv_cache_bytes": kv,
        "kv_cache_bytes_allocated": kv * s_bucket // s_len,
    }


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul", type=int, default=2048, help="size of the square matmul giving FLOP/s")
    parser.add_argument("--cache-dtype", default=None, help="e.g. bfloat16 (default: model dtype, float32)")
    parser.add_argument(
        "--layout", default="unrolled", choices=["unrolled", "scan"], help="jrft decode layout"
    )
    parser.add_argument(
        "--xla-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra XLA compile option of jrft's program, e.g. xla_cpu_multi_thread_eigen=false",
    )
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny model, batch 4, 16 new tokens")
    args = parser.parse_args()
    args.xla_options = {k: _parse_value(v) for k, v in (o.split("=", 1) for o in args.xla_option)}
    shape = FULL
    if args.tiny:
        shape, args.batch, args.new, args.repeats, args.matmul = TINY, [4], 16, 1, 256
    with tempfile.TemporaryDirectory() as d:
        hf = build_checkpoint(shape, d)
        model = from_pretrained(d)
    params = sum(p.numel() for p in hf.parameters())
    flops = {"jax": matmul_flops_jax(args.matmul), "torch": matmul_flops_torch(args.matmul)}
    print(
        f"model: {params / 1e6:.1f}M params; jrft layout {args.layout}, options {args.xla_options}; "
        f"torch threads {torch.get_num_threads()}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )
    print(
        f"matmul {args.matmul}^3 fp32: jax {flops['jax'] / 1e9:.0f} GFLOP/s, "
        f"torch {flops['torch'] / 1e9:.0f} GFLOP/s"
    )
    results = []
    for batch in args.batch:
        r = bench_batch(hf, model, params, batch, args, flops)
        results.append(r)
        print(
            f"batch {batch:4d}: transformers {r['hf_tok_s']:8.0f} tok/s | jrft {r['jrft_tok_s']:8.0f} tok/s"
            f" | ratio {r['ratio']:.2f}x"
            f" | jrft compile {r['jrft_compile_s']:.2f}s ({r['jrft_compiles']} compile)"
            f" | FLOP-floor fraction hf {r['hf_floor_fraction']:.3f} jrft {r['jrft_floor_fraction']:.3f}"
            f" | greedy agree {r['greedy_tokens_equal_fraction']:.3f}"
            f" | KV cache {r['kv_cache_bytes'] / 2**20:.1f} MiB"
            f" (allocated with buckets {r['kv_cache_bytes_allocated'] / 2**20:.1f} MiB)"
        )
    print(json.dumps({"params": params, "matmul_flops": flops, "results": results}))


if __name__ == "__main__":
    main()
