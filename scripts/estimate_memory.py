"""Per-device memory estimates (jrft.parallel.memory) for Llama-3-shaped 1B and 8B models on the default
meshes of a TPU v5e-8 (fsdp=8) and an 8-GPU node (fsdp=8), for SFT training and GRPO sampling.

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
# accelerator -> (mesh (data, fsdp, tensor), device memory GiB)
DEFAULTS = {"TPU v5e-8": ((1, 8, 1), 16), "8x H100 80GB": ((1, 8, 1), 80)}


def main() -> None:
    for name, hf in (("1B", LLAMA_1B), ("8B", LLAMA_8B)):
        cfg = ModelConfig.from_hf(hf)
        print(f"Llama-3 {name}: {cfg.num_params / 1e9:.2f}B params")
        for acc, (mesh, hbm) in DEFAULTS.items():
            for label, kw in (
                (
                    "SFT fp32 params, bf16 compute, batch 32 x 2048, remat full",
                    dict(batch=32, seq_len=2048, compute_bytes=2, remat="full"),
                ),
                (
                    "SFT bf16 params+opt, batch 32 x 2048, remat full",
                    dict(batch=32, seq_len=2048, param_bytes=2, opt_bytes=2, compute_bytes=2, remat="full"),
                ),
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
                print(
                    f"  {acc:13} mesh {mesh}: {label}: {est.total / 2**30:6.2f} GiB/device of {hbm} ({fits})"
                )


if __name__ == "__main__":
    main()
