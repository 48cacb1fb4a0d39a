"""transformers checkpoint -> jrft -> save_pretrained -> transformers round trips, and bad checkpoints."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jrft.data.local_tokenizer import train_tokenizer
from jrft.models import CheckpointError, from_pretrained, save_pretrained
from jrft.models.pretrained import INDEX_FILE, SINGLE_FILE, parse_size
from jrft.models.testing import hf_logits, mixed_padding_batch, save_tiny_hf_model


def _hf(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize(
    "family,tied,source_shard,save_shard",
    [
        ("llama", False, None, "2GB"),
        ("llama", True, "20KB", "30KB"),
        ("qwen2", False, "30KB", "2GB"),
        ("qwen3", True, None, "25KB"),
        ("gemma", True, None, "2GB"),
        ("gemma2", True, None, "2GB"),
    ],
)
def test_round_trip_through_transformers(tmp_path, family, tied, source_shard, save_shard):
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_tiny_hf_model(family, src, seed=5, tie_embeddings=tied, max_shard_size=source_shard)
    assert os.path.isfile(src / (INDEX_FILE if source_shard else SINGLE_FILE))
    model = from_pretrained(src)
    assert (model.lm_head is None) == tied
    tokenizer = train_tokenizer(alphabet="abcdefghij")
    save_pretrained(model, dst, tokenizer, max_shard_size=save_shard)
    sharded_out = save_shard != "2GB"
    assert os.path.isfile(dst / (INDEX_FILE if sharded_out else SINGLE_FILE))
    if sharded_out:
        index = json.loads((dst / INDEX_FILE).read_text())
        assert len(set(index["weight_map"].values())) > 1
    assert (dst / "tokenizer.json").is_file() and (dst / "generation_config.json").is_file()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dirs left behind
    tokens, mask = mixed_padding_batch(128, seed=1)
    original = hf_logits(_hf(src), tokens, mask)
    reloaded = hf_logits(_hf(dst), tokens, mask)
    valid = mask.astype(bool)
    np.testing.assert_array_less(np.abs(original - reloaded)[valid], 1e-5)
    # the same tensors, bit for bit, and no tied lm_head written
    a = {k: v for f in os.listdir(src) if f.endswith(".safetensors") for k, v in load_file(src / f).items()}
    b = {k: v for f in os.listdir(dst) if f.endswith(".safetensors") for k, v in load_file(dst / f).items()}
    if tied:
        a.pop("lm_head.weight", None)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_save_overwrites_atomically_and_bf16(tmp_path):
    save_tiny_hf_model("llama", tmp_path / "src", seed=0)
    model = from_pretrained(tmp_path / "src", param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert model.layers.wq[...].dtype == jnp.bfloat16
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_pretrained(model, out)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    again = from_pretrained(out)
    np.testing.assert_array_equal(
        np.asarray(again.layers.wq[...]), np.asarray(model.layers.wq[...].astype(jnp.float32))
    )


def test_scalar_head_saved_as_sequence_classification(tmp_path):
    import torch
    import transformers

    save_tiny_hf_model("qwen2", tmp_path / "src", seed=0)
    model = from_pretrained(tmp_path / "src", scalar_head=True, seed=4)
    tokens, mask = mixed_padding_batch(128, lengths=(6, 6))
    scores = np.asarray(model.score(tokens, mask))
    assert scores.shape == (2, 6) and scores.dtype == np.float32 and np.abs(scores).max() > 0
    save_pretrained(model, tmp_path / "rm")
    clf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        theirs = clf(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()  # last token's score
    np.testing.assert_allclose(theirs[:, 0], scores[:, -1], atol=1e-5)
    reloaded = from_pretrained(tmp_path / "rm", scalar_head=True, seed=99)  # head read, not re-initialised
    np.testing.assert_allclose(np.asarray(reloaded.score(tokens, mask)), scores, atol=1e-6)


def test_reward_model_from_sequence_classification_checkpoint(tmp_path):
    import torch

    from jrft.models.testing import build_hf_model, tiny_hf_config

    clf = build_hf_model(tiny_hf_config("llama"), seed=1, classifier=True)
    clf.save_pretrained(tmp_path)  # model.* + score.weight, no lm_head.weight
    model = from_pretrained(tmp_path, scalar_head=True)
    tokens = np.random.default_rng(0).integers(3, 128, (3, 7)).astype(np.int32)
    with torch.no_grad():
        theirs = clf(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()[:, 0]
    np.testing.assert_allclose(np.asarray(model.score(tokens))[:, -1], theirs, atol=1e-5)
    assert model.lm_head is not None  # freshly initialised: the checkpoint has none
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        from_pretrained(tmp_path)  # as a causal LM the missing LM head is an error


def _tamper(path, fn):
    tensors = load_file(path / SINGLE_FILE)
    fn(tensors)
    save_file(tensors, path / SINGLE_FILE, metadata={"format": "pt"})


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)
    save_tiny_hf_model("llama", tmp_path, seed=0)
    os.remove(tmp_path / SINGLE_FILE)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        from_pretrained(tmp_path)


def test_unsupported_model_type_names_it(tmp_path):
    save_tiny_hf_model("llama", tmp_path, seed=0)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match=r"config\.json.*'gpt_neox'"):
        from_pretrained(tmp_path)


def test_missing_tensor_names_file_and_tensor(tmp_path):
    save_tiny_hf_model("llama", tmp_path, seed=0)
    _tamper(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'.*safetensors"
    ):
        from_pretrained(tmp_path)


def test_wrong_shape_names_file_and_tensor(tmp_path):
    save_tiny_hf_model("qwen2", tmp_path, seed=0)

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.bias"] = t["model.layers.0.self_attn.k_proj.bias"][:8]

    _tamper(tmp_path, shrink)
    with pytest.raises(CheckpointError) as info:
        from_pretrained(tmp_path)
    msg = str(info.value)
    assert "model.safetensors" in msg and "'model.layers.0.self_attn.k_proj.bias'" in msg and "(8,)" in msg


def test_sharded_index_pointing_at_missing_tensor(tmp_path):
    save_tiny_hf_model("llama", tmp_path, seed=0, max_shard_size="20KB")
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    name = "model.layers.0.self_attn.q_proj.weight"
    file = index["weight_map"][name]
    tensors = load_file(tmp_path / file)
    tensors.pop(name)
    save_file(tensors, tmp_path / file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{file}: missing tensor '{name}'"):
        from_pretrained(tmp_path)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1KiB") == 1024 and parse_size(5) == 5
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


def test_corrupt_safetensors_names_the_file(tmp_path):
    save_tiny_hf_model("llama", tmp_path, seed=0)
    (tmp_path / SINGLE_FILE).write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a safetensors file"):
        from_pretrained(tmp_path)
