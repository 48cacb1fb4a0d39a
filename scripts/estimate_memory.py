"""Per-device memory estimates (jrft.parallel.memory) for Llama-3-shaped 1B and 8B models on the default
meshes of a TPU v5e-8 (fsdp=8) and an 8-GPU node (fsdp=8), for SFT training (with and without chunked
log-probs, ``train.logits_chunk_size``), DPO (reference on device or offloaded) and GRPO sampling.

    .venv/bin/python scripts/estimate_memory.py
"""

from __future__ import annotations

from jrft.models import ModelConfig
from jrft.parallel.memory import estimate_memory

LLAMA_1B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    tie_word_embeddings=True,
)
LLAMA_8B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=False,
)
# train.logits_chunk_size of the chunked rows (sequence positions per LM-head chunk)
CHUNK = 256
# accelerator -> (mesh (data, fsdp, tensor), device memory GiB)
DEFAULTS = {"TPU v5e-8": ((1, 8, 1), 16), "8x H100 80GB": ((1, 8, 1), 80)}


def main() -> None:
    for name, hf in (("1B", LLAMA_1B), ("8B", LLAMA_8B)):
        cfg = ModelConfig.from_hf(hf)
        print(f"Llama-3 {name}: {cfg.num_params / 1e9:.2f}B params")
        for acc, (mesh, hbm) in DEFAULTS.items():
            sft_fp32 = dict(batch=32, seq_len=2048, compute_bytes=2, remat="full")
            sft_bf16 = dict(sft_fp32, param_bytes=2, opt_bytes=2)
            dpo_bf16 = dict(sft_bf16, batch=32, reference=True, logits_chunk_size=CHUNK)  # 16 pairs = 32 rows
            for label, kw in (
                ("SFT fp32 params, bf16 compute, batch 32 x 2048, remat full", sft_fp32),
                (f"  same, logits_chunk_size {CHUNK}", dict(sft_fp32, logits_chunk_size=CHUNK)),
                ("SFT bf16 params+opt, batch 32 x 2048, remat full", sft_bf16),
                (f"  same, logits_chunk_size {CHUNK}", dict(sft_bf16, logits_chunk_size=CHUNK)),
                (f"DPO bf16, 16 pairs x 2048, chunk {CHUNK}, reference on device", dpo_bf16),
                ("  same, reference offloaded to host", dict(dpo_bf16, offload_reference=True)),
                (
                    "GRPO sampling 64 x 8 rows, 1024 tokens, bf16 cache",
                    dict(
                        batch=1,
                        seq_len=1,
                        training=False,
                        cache_batch=512,
                        cache_len=1024,
                        cache_bytes=2,
                        param_bytes=2,
                    ),
                ),
            ):
                est = estimate_memory(cfg, mesh_shape=mesh, **kw)
                fits = "fits" if est.total / 2**30 < 0.9 * hbm else "DOES NOT FIT"
                total, act = est.total / 2**30, est.activations / 2**30
                print(
                    f"  {acc:13} {mesh}: {label:62} {total:6.2f} GiB of {hbm} ({fits}; activations {act:.2f})"
                )


if __name__ == "__main__":
    main()
