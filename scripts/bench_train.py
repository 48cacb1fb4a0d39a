"""SFT and DPO train-step throughput: jrft (one jitted step) vs PyTorch transformers on the same model.

Same weights, same batch, same optimizer (AdamW + global-norm clipping), float32, CPU. Both sides run in
one process, interleaved (jrft, torch, jrft, torch, ...); medians are reported with their ratio, and each
step's achieved FLOP/s as a fraction of a large matmul's FLOP/s measured in the same run.

Run on an otherwise idle machine:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_train.py          # ~25M-param reference shape
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_train.py --tiny   # seconds: checks it runs

FLOPs per step: 6 x (non-embedding params + LM head) x tokens for the policy's forward+backward
(attention's T^2 term included), plus 2 x ... x tokens for DPO's reference forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_forward import REFERENCE, TINY  # noqa: E402


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large float32 matmul in JAX (the machine's practical ceiling)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def step_flops(cfg: dict, batch: int, seq: int, *, forward_only_copies: int = 0) -> float:
    """Approximate FLOPs of one train step (dense matmuls + attention scores)."""
    d, layers, mlp, v = (
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
        cfg["intermediate_size"],
        cfg["vocab_size"],
    )
    hd, h, kv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    per_layer = d * (h * hd) + 2 * d * (kv * hd) + (h * hd) * d + 3 * d * mlp
    matmul_params = layers * per_layer + d * v
    tokens = batch * seq
    attn = layers * 2 * 2 * batch * h * seq * seq * hd  # scores + weighted sum, forward
    forward = 2 * matmul_params * tokens + attn
    return 3 * forward + forward_only_copies * forward


def make_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(batch, seq), dtype=np.int32)
    loss_mask = np.ones((batch, seq), np.int32)
    loss_mask[:, : seq // 4] = 0  # a prompt quarter, as in completion-only SFT
    return {"tokens": tokens, "attention_mask": np.ones_like(tokens), "loss_mask": loss_mask}


def jrft_steps(path: str, batch_np: dict, pair_np: dict):
    """Jitted jrft SFT and DPO steps on the model at ``path``: ``(sft_fn, dpo_fn)``, each runs one step."""
    import jax
    import jax.numpy as jnp

    from jrft.models import from_pretrained
    from jrft.train.objectives import dpo, pairs, sft
    from jrft.train.optim import make_optimizer
    from jrft.train.state import create_train_state
    from jrft.train.step import jit_step, make_train_step

    tx, _ = make_optimizer(
        lr=1e-5, total_steps=1000, schedule="constant", weight_decay=0.0, max_grad_norm=1.0
    )
    graphdef, sft_state = create_train_state(from_pretrained(path), tx, seed=0)
    sft_step = jit_step(make_train_step(graphdef, sft.make_loss_fn(), sft.normalizers, tx))
    _, dpo_state = create_train_state(from_pretrained(path), tx, seed=0)
    ref_params = jax.tree.map(jnp.copy, dpo_state.params)
    reference = dpo.make_reference_fn(graphdef)
    dpo_step = jit_step(make_train_step(graphdef, dpo.make_loss_fn(beta=0.1), pairs.normalizers, tx))
    sft_batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    pair_batch = {k: jnp.asarray(v) for k, v in pair_np.items()}
    states = {"sft": sft_state, "dpo": dpo_state}

    def run_sft():
        states["sft"], m = sft_step(states["sft"], sft_batch)
        jax.block_until_ready(m["loss"])

    def run_dpo():
        b = {**pair_batch, **reference(ref_params, states["dpo"].rest, pair_batch)}
        states["dpo"], m = dpo_step(states["dpo"], b)
        jax.block_until_ready(m["loss"])

    return run_sft, run_dpo


def torch_steps(path: str, batch_np: dict, pair_np: dict, threads: int):
    """The same two steps in PyTorch: transformers' model, masked CE / DPO sigmoid loss, AdamW, clipping."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)

    def load():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.train()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)

    sft_model, sft_opt = load()
    dpo_model, dpo_opt = load()
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    t = {k: torch.as_tensor(v, dtype=torch.long) for k, v in batch_np.items()}
    p = {k: torch.as_tensor(v, dtype=torch.long) for k, v in pair_np.items()}

    def token_logps(model, tokens, mask):
        logits = model(input_ids=tokens, attention_mask=mask).logits[:, :-1].float()
        return torch.gather(F.log_softmax(logits, -1), 2, tokens[:, 1:, None])[..., 0]

    def run_sft():
        logps = token_logps(sft_model, t["tokens"], t["attention_mask"])
        m = t["loss_mask"][:, 1:].float()
        loss = -(logps * m).sum() / m.sum()
        sft_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sft_model.parameters(), 1.0)
        sft_opt.step()

    def seq_logps(model, side):
        tokens = torch.cat([p["chosen_tokens"], p["rejected_tokens"]])
        mask = torch.cat([p["chosen_attention_mask"], p["rejected_attention_mask"]])
        lm = torch.cat([p["chosen_loss_mask"], p["rejected_loss_mask"]])[:, 1:].float()
        return (token_logps(model, tokens, mask) * lm).sum(-1)

    def run_dpo():
        n = p["chosen_tokens"].shape[0]
        with torch.no_grad():
            ref = seq_logps(ref_model, None)
        pol = seq_logps(dpo_model, None)
        logits = 0.1 * ((pol[:n] - ref[:n]) - (pol[n:] - ref[n:]))
        loss = -F.logsigmoid(logits).mean()
        dpo_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dpo_model.parameters(), 1.0)
        dpo_opt.step()

    return run_sft, run_dpo


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and few repeats (smoke test)")
    parser.add_argument("--batch", type=int, default=16, help="SFT rows; DPO uses batch/2 pairs")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("note: run torch with OMP_WAIT_POLICY=PASSIVE for stable figures", file=sys.stderr)
    cfg = TINY if args.tiny else REFERENCE
    batch, seq, repeats = (4, 32, 2) if args.tiny else (args.batch, args.seq, args.repeats)

    from jrft.models.testing import build_hf_model, tiny_hf_config

    hf_cfg = tiny_hf_config("llama", **cfg, tie_word_embeddings=False, max_position_embeddings=max(seq, 256))
    sft_np = make_batch(cfg["vocab_size"], batch, seq)
    pairs = batch // 2
    c, r = make_batch(cfg["vocab_size"], pairs, seq, 1), make_batch(cfg["vocab_size"], pairs, seq, 2)
    pair_np = {f"chosen_{k}": v for k, v in c.items()} | {f"rejected_{k}": v for k, v in r.items()}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_hf_model(hf_cfg, seed=0, noise=0.02)
        model.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        del model
        peak = matmul_flops(512 if args.tiny else 2048)
        t0 = time.perf_counter()
        j_sft, j_dpo = jrft_steps(tmp, sft_np, pair_np)
        j_sft(), j_dpo()  # compile
        compile_s = time.perf_counter() - t0
        t_sft, t_dpo = torch_steps(tmp, sft_np, pair_np, args.threads)
        t_sft(), t_dpo()  # warm-up
        results = {}
        for name, jf, tf, flops in (
            ("sft", j_sft, t_sft, step_flops(cfg, batch, seq)),
            ("dpo", j_dpo, t_dpo, step_flops(cfg, 2 * pairs, seq, forward_only_copies=1)),
        ):
            jt, tt = [], []
            for _ in range(repeats):  # interleaved
                jt += timed(jf, 1)
                tt += timed(tf, 1)
            results[name] = (statistics.median(jt), statistics.median(tt), flops)
    tokens = {"sft": batch * seq, "dpo": 2 * pairs * seq}
    print(
        f"model: {n_params / 1e6:.1f}M params, batch {batch} x {seq} tokens (DPO: {pairs} pairs), fp32, CPU"
    )
    print(
        f"large-matmul ceiling: {peak / 1e9:.0f} GFLOP/s (JAX); jrft compile (both steps): {compile_s:.1f} s"
    )
    print(
        f"{'step':5} {'jrft s':>8} {'torch s':>8} {'jrft tok/s':>11} {'torch tok/s':>12} {'ratio':>6} "
        f"{'jrft %peak':>10} {'torch %peak':>11}"
    )
    for name, (jt, tt, flops) in results.items():
        print(
            f"{name:5} {jt:8.3f} {tt:8.3f} {tokens[name] / jt:11.0f} {tokens[name] / tt:12.0f} "
            f"{tt / jt:6.2f} {100 * flops / jt / peak:9.0f}% {100 * flops / tt / peak:10.0f}%"
        )
    print("ratio = jrft tokens/s / torch tokens/s (> 1: jrft faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
