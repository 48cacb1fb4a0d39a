"""Forward-pass throughput of jrft (jitted) vs transformers PyTorch on the same Llama model, CPU, float32,
plus the peak host memory of ``jrft.models.from_pretrained`` for that checkpoint.

Run on an otherwise idle machine (two busy processes on 2 cores ruin every figure), with torch's threads
passive so they do not spin against XLA's:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_forward.py            # ~25M-param reference shape
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_forward.py --tiny     # seconds: checks it runs

Both frameworks run in one process, interleaved (jrft, torch, jrft, torch, ...), and the medians are
reported. The model is NOTES.md's reference shape: vocab 2048, hidden 512, 8 layers, 8 heads, 4 kv heads,
MLP 1376 (25.3M parameters). Peak memory of ``from_pretrained`` is measured in a fresh subprocess
(high-water RSS after loading, and the RSS after imports).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REFERENCE = dict(
    vocab_size=2048,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
)
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def _status_mib(field: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (high-water mark) of this process, MiB. VmHWM, unlike
    ``getrusage().ru_maxrss``, is not inherited from the parent through fork + exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure_load(path: str) -> dict:
    """In a fresh process: RSS after imports, peak RSS after ``from_pretrained`` (MiB)."""
    import jax

    from jrft.models import from_pretrained

    jax.numpy.zeros(1).block_until_ready()  # initialise the backend before the baseline
    base = _status_mib("VmRSS")
    t0 = time.perf_counter()
    model = from_pretrained(path)
    jax.block_until_ready(model.embed[...])
    seconds = time.perf_counter() - t0
    peak = _status_mib("VmHWM")
    return {"rss_after_imports_mib": base, "peak_rss_mib": peak, "load_seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and few repeats (smoke test)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--measure-load", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_load:
        print(json.dumps(measure_load(args.measure_load)))
        return 0

    import jax
    import numpy as np
    import torch

    from jrft.models import from_pretrained
    from jrft.models.testing import build_hf_model, hf_logits, tiny_hf_config

    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("note: set OMP_WAIT_POLICY=PASSIVE for stable torch timings", file=sys.stderr)
    torch.set_num_threads(args.threads)
    shape = TINY if args.tiny else REFERENCE
    batch, seq, repeats = (2, 16, 3) if args.tiny else (args.batch, args.seq, args.repeats)

    with tempfile.TemporaryDirectory() as tmp:
        hf_model = build_hf_model(
            tiny_hf_config("llama", **shape, max_position_embeddings=4096), seed=0, noise=0.02
        )
        hf_model.save_pretrained(tmp)
        n_params = sum(p.numel() for p in hf_model.parameters())
        size_mib = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)) / 2**20
        load = json.loads(
            subprocess.run(
                [sys.executable, __file__, "--measure-load", tmp], check=True, capture_output=True, text=True
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        model = from_pretrained(tmp)

    tokens = np.random.default_rng(0).integers(3, shape["vocab_size"], (batch, seq)).astype(np.int32)
    mask = np.ones_like(tokens)
    forward = jax.jit(lambda m, t, a: m(t, a))
    t0 = time.perf_counter()
    ours = np.asarray(forward(model, tokens, mask))
    compile_s = time.perf_counter() - t0
    diff = float(np.abs(ours - hf_logits(hf_model, tokens, mask)).max())
    torch_tokens = torch.as_tensor(tokens, dtype=torch.long)
    torch_mask = torch.as_tensor(mask, dtype=torch.long)

    def run_jax():
        forward(model, tokens, mask).block_until_ready()

    def run_torch():
        with torch.no_grad():
            hf_model(input_ids=torch_tokens, attention_mask=torch_mask)

    run_jax(), run_torch()  # warm up both
    times = {"jrft": [], "torch": []}
    for _ in range(repeats):
        for name, fn in (("jrft", run_jax), ("torch", run_torch)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: batch * seq / v for k, v in med.items()}
    print(f"model: llama {n_params / 1e6:.1f}M params ({size_mib:.0f} MiB safetensors), fp32, CPU")
    print(f"batch {batch} x {seq} tokens, {repeats} interleaved repeats, torch threads {args.threads}")
    print(f"parity: max |logit diff| jrft vs transformers = {diff:.1e}; jrft compile {compile_s:.2f}s")
    for k in ("jrft", "torch"):
        print(f"  {k:6s} median {med[k] * 1e3:8.1f} ms   {tps[k]:10.0f} tokens/s")
    print(f"  ratio jrft/torch tokens/s: {tps['jrft'] / tps['torch']:.2f}x")
    base, peak = load["rss_after_imports_mib"], load["peak_rss_mib"]
    print(
        f"from_pretrained: {load['load_seconds']:.2f}s, peak RSS {peak:.0f} MiB "
        f"(after imports {base:.0f} MiB: "
        f"+{peak - base:.0f} MiB for {size_mib:.0f} MiB of weights)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
