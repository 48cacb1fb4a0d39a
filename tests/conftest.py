"""Test-wide setup: 8 fake CPU devices so sharding tests can build real meshes.

The flag must be set before JAX initialises its backend, hence here, before any test imports jax.
Unsharded computations run on device 0 as usual.
"""

import os

# The tests' programs are tiny: compiling dominates, so LLVM's expensive optimisations are switched off
# (measured: tests/test_train_grpo.py 98 s -> 69 s). Both sides of every equality test share the flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 " + FAST_COMPILE)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def shared_compilations(tmp_path_factory):
    """A persistent JAX compilation cache for the whole session (and the subprocesses tests start): many
    tests build the same jitted programs again from fresh closures; each distinct one compiles once."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    cache = str(tmp_path_factory.mktemp("jax_cache"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()
    yield


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory):
    """A char tokenizer, a random 2-layer llama saved in transformers format (no torch), and 2-digit
    addition task files: SFT, preference and prompt-only rows (train and held-out)."""
    from flax import nnx

    from jrft.data import synthetic
    from jrft.models import Decoder, ModelConfig, save_pretrained
    from jrft.models.testing import tiny_hf_config

    root = tmp_path_factory.mktemp("tiny_task")
    tokenizer = synthetic.arithmetic_tokenizer()
    cfg = tiny_hf_config(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Decoder(ModelConfig.from_hf(cfg), rngs=nnx.Rngs(0))
    model_dir = save_pretrained(model, root / "model", tokenizer)
    task = synthetic.AdditionTask(num_digits=2)
    train = task.sample(256, split="train", seed=0)
    heldout = task.sample(64, split="heldout", seed=0)
    w = synthetic.write_jsonl
    return {
        "root": root,
        "model": model_dir,
        "sft_train": w(synthetic.sft_rows(train), root / "sft_train.jsonl"),
        "sft_eval": w(synthetic.sft_rows(heldout), root / "sft_eval.jsonl"),
        "pref_train": w(synthetic.preference_rows(train), root / "pref_train.jsonl"),
        "pref_eval": w(synthetic.preference_rows(heldout, seed=1), root / "pref_eval.jsonl"),
        "prompts": w(synthetic.prompt_rows(train), root / "prompts.jsonl"),
    }


@pytest.fixture(scope="session")
def tiny_sft(tiny_task):
    """The overrides every short SFT run on ``tiny_task`` shares (the model, its SFT rows, their lengths);
    a test adds its output_dir, steps, batch size, LoRA settings, ..."""
    return [
        "objective=sft",
        f"model.path={tiny_task['model']}",
        f"data.train={tiny_task['sft_train']}",
        "data.buckets=32",
        "data.max_length=64",
    ]


def param_arrays(state) -> list:
    """Every parameter of a train state as host numpy arrays (for comparisons between runs)."""
    import jax
    import numpy as np

    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def tiny_lora_llama_hf():
    """The small Llama of the LoRA tests (4 query heads, 2 kv heads, head dim 8): an HF config."""
    from jrft.models.testing import tiny_hf_config

    return tiny_hf_config(
        "llama",
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
