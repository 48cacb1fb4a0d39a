"""One full GRPO step (P prompts x G = 8 completions, 128 new tokens, rewards, update): jrft vs TRL's
``GRPOTrainer`` (no vLLM) on the same model, prompts, lengths and hyperparameters. CPU, float32.

Both use: temperature 1.0, no top-k/top-p, beta 0 (no reference model), one optimizer step per
generation round (mu = 1), the DAPO token-mean loss, AdamW lr 1e-6, the same Python reward function.
TRL runs with gradient checkpointing off (its default is on, which would only slow it down here) and its
`generate` with the KV cache. The two sides alternate (jrft run, TRL run, ...); per-step medians exclude
each run's first step (compilation / warm-up). jrft's time split comes from its round metrics.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_grpo.py            # 25M params, P=4, 128 tokens
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_grpo.py --tiny     # smoke test

``--varied-lengths`` times only jrft's GRPO update (no sampling, no TRL) on a rollout whose completion lengths
are drawn uniformly from 10..128 tokens (P x G rows, 8-16-token prompts): the same rollout's update with
padded rows and with packed rows (``train.pack_rows``), alternating, and prints update tokens/s (real
prompt + completion tokens / second, the host-side packing included) and the padded fraction of each::

    .venv/bin/python scripts/bench_grpo.py --varied-lengths                # 25M params, P=4, G=8

Needs the bench extra (``pip install -e '.[bench]'``: trl).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench_forward import REFERENCE, TINY  # noqa: E402

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven small birds sing about numbers and rivers".split()
)


def reward_len_variety(completions, **kwargs):
    """A cheap host reward: distinct characters / length (some spread within every group)."""
    return [len(set(c)) / (1 + len(c)) for c in completions]


def build_assets(root: str, cfg: dict, num_prompts: int, seed: int = 0):
    """A BPE tokenizer of the model's vocab size, the model saved in transformers format, prompt rows."""
    import random

    from jrft.data.local_tokenizer import train_tokenizer
    from jrft.models.testing import build_hf_model, tiny_hf_config

    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)]
    tok = train_tokenizer(texts, kind="bpe", vocab_size=cfg["vocab_size"])
    vocab = len(tok)
    hf_cfg = tiny_hf_config(
        "llama",
        **{**cfg, "vocab_size": max(vocab, cfg["vocab_size"])},
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = build_hf_model(hf_cfg, seed=seed, noise=0.02)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(num_prompts * 64)]
    rows = os.path.join(root, "prompts.jsonl")
    with open(rows, "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    return rows, prompts


def run_jrft(model_dir, rows, out, *, prompts_per_step, new_tokens, steps) -> dict:
    from jrft.config import load_config
    from jrft.rewards import RewardRunner
    from jrft.train.runs.grpo import run_grpo

    cfg = load_config(
        None,
        [
            "objective=grpo",
            f"output_dir={out}",
            f"model.path={model_dir}",
            f"data.train={rows}",
            "data.format=prompt_only",
            "data.buckets=16",
            "data.add_bos=false",
            "optim.lr=1e-6",
            "optim.schedule=constant",
            "optim.weight_decay=0.0",
            f"train.batch_size={prompts_per_step}",
            f"train.steps={steps}",
            "train.log_every=1",
            "train.save_every=0",
            "grpo.num_generations=8",
            f"grpo.max_new_tokens={new_tokens}",
            "grpo.beta=0.0",
            "grpo.loss_aggregation=dapo",
            "grpo.log_completions_every=0",
            "grpo.reward_functions=[{name: length}]",  # replaced by the runner below
        ],
    )
    runner = RewardRunner([reward_len_variety], group_size=8)
    run_grpo(cfg, progress=False, runner=runner)
    rows_ = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][1:]  # drop compile step
    keys = ("time/round", "time/sample", "time/rewards", "time/logps", "time/update", "completion_length")
    return {k: statistics.median(r[k] for r in rows_) for k in keys}


def bench_packed_update(cfg, *, prompts_per_step, new_tokens, min_new, reps, seed=0) -> dict:
    """Update seconds (median of ``reps``, after one compile call each) of one GRPO update over the same
    varied-length rollout, padded vs packed."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from jrft.config import GRPOConfig
    from jrft.models import Decoder, ModelConfig
    from jrft.models.testing import tiny_hf_config
    from jrft.parallel.mesh import make_mesh
    from jrft.train import grpo_round, rounds
    from jrft.train.placement import device_batch, place_state
    from jrft.train.rollout import Rollout
    from jrft.train.state import create_train_state

    rng = np.random.default_rng(seed)
    g = 8
    n, tp, tc = prompts_per_step * g, 16, new_tokens
    prompt = np.repeat(rng.integers(8, tp + 1, size=prompts_per_step), g)
    completion = rng.integers(min_new, new_tokens + 1, size=n)
    cols = np.arange(tp + tc)[None]
    attention = ((cols >= tp - prompt[:, None]) & (cols < tp + completion[:, None])).astype(np.int32)
    tokens = (rng.integers(3, cfg["vocab_size"], size=(n, tp + tc)) * attention).astype(np.int32)
    rollout = Rollout(
        tokens=tokens,
        attention_mask=attention,
        completion_mask=attention[:, tp:].copy(),
        sampler_logps=np.zeros((n, tc), np.float32),
        truncated=np.zeros(n, bool),
        prompt_length=tp,
        prompts=[""] * n,
        columns={},
        completions=[""] * n,
        completion_ids=[[]] * n,
    )
    real_tokens = int(attention.sum())
    model = Decoder(ModelConfig.from_hf(tiny_hf_config("llama", **cfg)), rngs=nnx.Rngs(seed))
    tx = optax.adamw(1e-6)
    graphdef, state = create_train_state(model, tx, seed=seed)
    mesh = make_mesh(data=1, devices=jax.devices()[:1])
    state, shardings = place_state(state, mesh)
    config = GRPOConfig(num_generations=g, max_new_tokens=new_tokens, beta=0.0, loss_aggregation="dapo")
    rows = device_batch(
        {"completion_mask": rollout.completion_mask, "advantages": rng.normal(size=n).astype(np.float32)},
        mesh,
    )
    sides = {}
    for pack in (False, True):
        options = rounds.RoundOptions(mesh=mesh, state_sharding=shardings, pad_token_id=0, pack_rows=pack)
        sides[pack] = (options, grpo_round.update_step(config, graphdef, tx, options))
    times: dict[bool, list[float]] = {False: [], True: []}
    prepare: dict[bool, list[float]] = {False: [], True: []}  # host layout + transfer, inside times
    fractions = {}
    for rep_ in range(reps + 1):  # the first call of each side compiles
        for pack, (options, update) in sides.items():
            t0 = time.perf_counter()
            inputs = rounds.UpdateInputs(rollout, options)
            batch = {**rows, **inputs.mini(np.arange(n))}
            jax.block_until_ready(batch)
            t1 = time.perf_counter()
            state, metrics = update(state, batch)
            jax.block_until_ready((state, metrics))
            if rep_:
                times[pack].append(time.perf_counter() - t0)
                prepare[pack].append(t1 - t0)
            fractions[pack] = inputs.padded_fraction()
    out = {}
    for pack, name in ((False, "padded"), (True, "packed")):
        seconds = statistics.median(times[pack])
        out[name] = {
            "seconds": seconds,
            "tokens_per_s": real_tokens / seconds,
            "padded_fraction": fractions[pack],
            "all_seconds": times[pack],
            "prepare_seconds": statistics.median(prepare[pack]),
        }
    out["rows"] = n
    out["real_tokens"] = real_tokens
    out["mean_completion"] = float(completion.mean())
    return out


def run_trl(model_dir, prompts, out, *, prompts_per_step, new_tokens, steps, threads) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(threads)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    g = 8
    args = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=prompts_per_step * g,
        num_generations=g,
        max_completion_length=new_tokens,
        temperature=1.0,
        beta=0.0,
        learning_rate=1e-6,
        loss_type="dapo",
        gradient_checkpointing=False,
        use_cpu=True,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_dropout=True,
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward_len_variety],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tok,
        callbacks=[Timer()],
    )
    trainer.train()
    lengths = [
        h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h
    ]
    return {"time/round": statistics.median(times[1:]), "completion_length": statistics.median(lengths)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--prompts", type=int, default=4, help="P prompts per step (x G = 8)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is dropped)")
    parser.add_argument("--runs", type=int, default=2, help="alternating runs per side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--varied-lengths",
        action="store_true",
        help="GRPO update only: padded vs packed rows",
    )
    parser.add_argument("--reps", type=int, default=5, help="--varied-lengths: timed updates per side")
    args = parser.parse_args(argv)
    cfg = TINY if args.tiny else REFERENCE
    if args.varied_lengths:
        r = bench_packed_update(
            cfg,
            prompts_per_step=args.prompts,
            new_tokens=args.new_tokens,
            min_new=min(10, args.new_tokens),
            reps=2 if args.tiny else args.reps,
        )
        print(
            f"GRPO update, {args.prompts} prompts x G=8 = {r['rows']} rows, completions uniform in "
            f"{min(10, args.new_tokens)}..{args.new_tokens} tokens (mean {r['mean_completion']:.0f}), "
            f"{r['real_tokens']} real tokens, CPU fp32"
        )
        for name in ("padded", "packed"):
            m = r[name]
            print(
                f"{name}: {m['seconds']:.2f} s/update  {m['tokens_per_s']:.0f} tokens/s  "
                f"padded fraction {m['padded_fraction']:.2f}  rows laid out in {m['prepare_seconds']:.3f} s  "
                f"(each: {', '.join(f'{x:.2f}' for x in m['all_seconds'])} s)"
            )
        print(f"packed / padded tokens/s: {r['packed']['tokens_per_s'] / r['padded']['tokens_per_s']:.2f}x")
        return 0
    new_tokens, steps, runs = (16, 3, 1) if args.tiny else (args.new_tokens, args.steps, args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        rows, prompts = build_assets(model_dir, cfg, args.prompts)
        jr, tr = [], []
        for r in range(runs):
            kw = dict(prompts_per_step=args.prompts, new_tokens=new_tokens, steps=steps)
            jr.append(run_jrft(model_dir, rows, os.path.join(tmp, f"jrft{r}"), **kw))
            tr.append(run_trl(model_dir, prompts, os.path.join(tmp, f"trl{r}"), threads=args.threads, **kw))
    j = {k: statistics.median(x[k] for x in jr) for k in jr[0]}
    t = {k: statistics.median(x[k] for x in tr) for k in tr[0]}
    completions = args.prompts * 8
    print(f"GRPO step: {args.prompts} prompts x G=8, {new_tokens} new tokens max, CPU fp32")
    for name, m in (("jrft", j), ("TRL", t)):
        tokens = completions * m["completion_length"]
        print(
            f"{name:5} {m['time/round']:7.2f} s/step  mean completion {m['completion_length']:.0f} tokens  "
            f"{tokens / m['time/round']:.0f} rollout tokens/s (whole step)"
        )
    print(f"ratio (TRL s/step / jrft s/step): {t['time/round'] / j['time/round']:.2f}x")
    split = ", ".join(
        f"{k.split('/')[1]} {j[k]:.2f} s"
        for k in ("time/sample", "time/rewards", "time/logps", "time/update")
    )
    print(f"jrft step split: {split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
