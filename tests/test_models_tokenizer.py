"""Tests for jrft.data.local_tokenizer: char and byte-level BPE tokenizers built from strings."""

import pytest
from transformers import AutoTokenizer

from jrft.data.local_tokenizer import DEFAULT_CHAT_TEMPLATE, train_tokenizer


def test_char_tokenizer_ids_and_decode():
    tok = train_tokenizer(alphabet="0123456789+=", added_tokens=["<think>"])
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    ids = tok("12+3=<think>")["input_ids"]
    assert ids == [8, 9, 17, 10, 18, 19]  # 7 specials, then the alphabet in order, then added tokens
    assert tok.decode(ids) == "12+3=<think>"
    # added tokens are not special: skip_special_tokens keeps them
    assert tok.decode([1] + ids + [2], skip_special_tokens=True) == "12+3=<think>"
    assert tok("x")["input_ids"] == [tok.unk_token_id]


def test_char_tokenizer_alphabet_from_texts_keeps_whitespace():
    tok = train_tokenizer(["ab c", "d\ne"])
    ids = tok("a c\ne")["input_ids"]
    assert len(ids) == 5 and tok.unk_token_id not in ids
    assert tok.decode(ids) == "a c\ne"


def test_chat_template_and_round_trip(tmp_path):
    tok = train_tokenizer(alphabet="0123456789+=")
    messages = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<bos><|user|>1+2=<eos><|assistant|>3<eos>"
    prompt_ids = tok.apply_chat_template(messages[:1], add_generation_prompt=True)["input_ids"]
    assert prompt_ids[0] == tok.bos_token_id and tok.convert_ids_to_tokens(prompt_ids[-1]) == "<|assistant|>"
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("12+3=")["input_ids"] == tok("12+3=")["input_ids"]
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE
    assert loaded.pad_token == "<pad>" and loaded.eos_token_id == 2


def test_bpe_tokenizer_trains_merges_and_round_trips(tmp_path):
    texts = ["hello world", "hello there", "the world is wide"] * 20
    tok = train_tokenizer(texts, kind="bpe", vocab_size=300, add_bos_token=True)
    ids = tok("hello world")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) < 1 + len("hello world")  # merges learned
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"
    assert tok.decode(tok("unseen ünïcode")["input_ids"], skip_special_tokens=True) == "unseen ünïcode"
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("hello world")["input_ids"] == ids


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(["a"], kind="wordpiece")
    with pytest.raises(ValueError, match="alphabet"):
        train_tokenizer(kind="char")
    with pytest.raises(ValueError, match="<unk>"):
        train_tokenizer(["a"], special_tokens=["<pad>", "<bos>", "<eos>"])
