"""TRL's other dataset formats: plain ``text`` rows, preference rows whose prompt is the shared start of
chosen and rejected, and KTO's unpaired prompt/completion/label rows; detected, validated row by row."""

import string

import numpy as np
import pytest

from jrft.data import DataError, build_dataset, train_tokenizer
from jrft.data.batching import collate_unpaired
from jrft.data.formats import split_implicit_prompt


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(alphabet=string.ascii_letters + string.digits + " +=.,?!")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


USER = {"role": "user", "content": "hi"}


def said(text):
    return {"role": "assistant", "content": text}


def test_text_rows_train_on_every_token(tok):
    ds = build_dataset([{"text": "abc def"}], tok, objective="sft")
    assert (ds.format, ds.kind) == ("text", "sft")
    ex = ds.examples[0]
    assert ex["tokens"].tolist() == [tok.bos_token_id] + ids(tok, "abc def") + [tok.eos_token_id]
    assert ex["loss_mask"].tolist() == [0] + [1] * (len(ex["tokens"]) - 1)


def test_implicit_prompt_conversations_equal_explicit_prompt_rows(tok):
    implicit = {"chosen": [USER, said("good")], "rejected": [USER, said("bad")]}
    explicit = {"prompt": [USER], "chosen": [said("good")], "rejected": [said("bad")]}
    a = build_dataset([implicit], tok, objective="dpo")
    b = build_dataset([explicit], tok, objective="dpo")
    assert a.format == "implicit_preference" and a.kind == "preference"
    for key in ("chosen_tokens", "chosen_loss_mask", "rejected_tokens", "rejected_loss_mask"):
        np.testing.assert_array_equal(a.examples[0][key], b.examples[0][key])


def test_implicit_prompt_strings_split_like_trl():
    assert split_implicit_prompt("The sky is blue", "The sky is green") == ("The sky is", " blue", " green")
    assert split_implicit_prompt([USER, said("a")], [USER, said("b")]) == ([USER], [said("a")], [said("b")])


def test_unpaired_rows_carry_label_and_a_mismatched_kl_pair(tok):
    rows = [
        {"prompt": "ab", "completion": "cd", "label": True},
        {"prompt": "ef", "completion": "gh", "label": False},
        {"prompt": "ij", "completion": "kl", "label": True},
    ]
    ds = build_dataset(rows, tok)
    assert (ds.format, ds.kind) == ("unpaired", "unpaired")
    bos, eos = [tok.bos_token_id], [tok.eos_token_id]
    ex = ds.examples[1]
    assert ex["label"] is False
    assert ex["chosen_tokens"].tolist() == bos + ids(tok, "ef") + ids(tok, "gh") + eos
    assert ex["rejected_tokens"].tolist() == bos + ids(tok, "ef") + ids(tok, "cd") + eos  # previous row's
    assert ds.examples[0]["rejected_tokens"].tolist() == bos + ids(tok, "ab") + ids(tok, "kl") + eos
    batch = collate_unpaired(ds.examples, [[0], [1], []], 8, 0)
    assert batch["label"].tolist() == [1.0, 0.0, 0.0] and batch["chosen_tokens"].shape == (3, 8)


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"text": ""}], r"row 0: field 'text': empty text"),
        ([{"text": "a"}, {"text": 3}], r"row 1: field 'text': expected a string"),
        (
            [{"chosen": [USER, said("a")], "rejected": [said("b")]}],
            r"row 0: field 'chosen': chosen and rejected share no start",
        ),
        (
            [{"chosen": [USER, said("a")], "rejected": [USER, said("a")]}],
            r"row 0: field 'chosen': nothing after the shared prompt",
        ),
        ([{"chosen": [USER, said("a")], "rejected": "b"}], r"row 0: field 'rejected': chosen and rejected"),
        (
            [{"prompt": "a", "completion": "b", "label": True},
             {"prompt": "a", "completion": "b", "label": 1}],
            r"row 1: field 'label': expected true \(desirable\) or false",
        ),
        ([{"prompt": "a", "completion": "", "label": True}], r"row 0: field 'completion': empty text"),
        (
            [{"prompt": "a", "completion": "b", "label": True}, {"prompt": [USER], "completion": [said("c")],
                                                                  "label": False}],
            r"row 0: field 'completion': unpaired rows must be all strings or all conversations: the KL term "
            r"pairs this prompt \(a string\) with the previous row's completion \(a conversation\)",
        ),
    ],
)  # fmt: skip
def test_bad_rows_name_source_row_field(tok, rows, match):
    with pytest.raises(DataError, match=match) as info:
        build_dataset(rows, tok)
    assert str(info.value).startswith("<inline rows>")


def test_formats_can_be_named_in_the_config():
    from jrft.config import DATA_FORMATS
    from jrft.data.formats import FORMATS

    assert set(DATA_FORMATS) == set(FORMATS) | {"auto"}
