"""Text-level generation: strings and chat messages through a local tokenizer, decoded completions."""

import tempfile

import numpy as np
import pytest

from jrft.data.local_tokenizer import train_tokenizer
from jrft.models import from_pretrained
from jrft.models import testing as mt
from jrft.sampling import generate
from jrft.sampling.text import encode_prompt, generate_text, left_pad


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer(alphabet="abcdefghij0123456789+= ")
    path = mt.save_tiny_hf_model(
        "llama", tempfile.mkdtemp(prefix="jrft_sampling_text_"), seed=2, vocab_size=len(tok)
    )
    return from_pretrained(path), tok


def test_chat_prompts_use_the_template_with_generation_prompt(setup):
    _, tok = setup
    ids = encode_prompt(tok, [{"role": "user", "content": "1+2="}])
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert encode_prompt(tok, "1+2=", chat=True) == ids
    assert encode_prompt(tok, "1+2=") == tok("1+2=")["input_ids"]
    tokens, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])


def test_generate_text_decodes_the_token_level_result(setup):
    model, tok = setup
    prompts = ["ab+c", [{"role": "user", "content": "12+34="}], "9"]
    out = generate_text(model, tok, prompts, max_new_tokens=12, temperature=0.0, num_samples=2)
    assert len(out.texts) == 6 and len(out.groups()) == 3
    assert all(a == b for a, b in out.groups())  # greedy: identical samples
    # same tokens as calling generate on the tokenizer's own ids, left-padded with the pad id
    ids = [encode_prompt(tok, p) for p in prompts]
    tokens, mask = left_pad(ids, tok.pad_token_id)
    ref = generate(
        model,
        tokens,
        mask,
        max_new_tokens=12,
        temperature=0.0,
        num_samples=2,
        stop_token_ids=[tok.eos_token_id],
    )
    np.testing.assert_array_equal(out.result.tokens, ref.tokens)
    for text, row, n in zip(out.texts, np.asarray(ref.tokens), np.asarray(ref.lengths), strict=True):
        assert text == tok.decode(row[:n].tolist(), skip_special_tokens=True)
        assert (row[: n - 1] != tok.eos_token_id).all()  # stops at the tokenizer's eos by default


def test_generate_text_rejects_a_bare_prompt(setup):
    model, tok = setup
    with pytest.raises(ValueError, match="LIST of prompts"):
        generate_text(model, tok, "abc", max_new_tokens=2)
