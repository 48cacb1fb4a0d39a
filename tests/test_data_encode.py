"""Formats, validation errors (source/row/field), tokenization, BOS/EOS, masks, over-long policies, chat."""

import string

import numpy as np
import pytest

from jrft.data import DataError, EncodeOptions, build_dataset, encode_chat, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(alphabet=string.ascii_letters + string.digits + " +=.,?!")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_completion_tokens_and_masks(tok):
    ds = build_dataset([{"prompt": "ab", "completion": "cd"}], tok, objective="sft")
    ex = ds.examples[0]
    assert ds.format == "prompt_completion" and ds.kind == "sft"
    expected = [tok.bos_token_id] + ids(tok, "ab") + ids(tok, "cd") + [tok.eos_token_id]
    assert ex["tokens"].tolist() == expected
    assert ex["loss_mask"].tolist() == [0, 0, 0, 1, 1, 1]
    full = build_dataset(
        [{"prompt": "ab", "completion": "cd"}],
        tok,
        options=EncodeOptions(completion_only_loss=False, add_bos=False),
    )
    assert full.examples[0]["tokens"].tolist() == expected[1:]
    assert full.examples[0]["loss_mask"].tolist() == [0, 1, 1, 1, 1]  # position 0 is never a target


@pytest.mark.parametrize(
    "rows, objective, match",
    [
        (
            [{"prompt": "a", "completion": "b"}, {"prompt": "a"}],
            None,
            r"row 1: field 'completion': missing column",
        ),
        (
            [{"prompt": "a", "completion": 5}],
            "sft",
            r"row 0: field 'completion': expected a string or a list",
        ),
        ([{"prompt": "a", "completion": "  "}], "sft", r"row 0: field 'completion': empty text"),
        (
            [{"prompt": "a", "completion": "b"}, {"prompt": 3, "completion": "b"}],
            "sft",
            r"row 1: field 'prompt'",
        ),
        (
            [{"messages": [{"role": "user", "content": "hi"}]}],
            "sft",
            r"field 'messages': no assistant message",
        ),
        ([{"messages": [{"role": "bot", "content": "x"}]}], "sft", r"field 'messages\[0\]\.role'"),
        ([{"messages": [{"role": "assistant", "content": ""}]}], "sft", r"messages\[0\]\.content': empty"),
        ([{"prompt": "a", "chosen": "b", "rejected": ""}], "dpo", r"row 0: field 'rejected': empty text"),
        (
            [{"prompt": "a", "chosen": "b", "rejected": ["x"]}],
            "dpo",
            r"field 'rejected\[0\]': expected a message",
        ),
        (
            [{"prompt": "a", "completions": ["b", "c"], "ranking": [0, 0]}],
            "reward",
            r"field 'ranking': must be",
        ),
        ([{"prompt": "a", "completions": ["b"], "ranking": [0]}], "reward", r"field 'completions'"),
        ([{"prompt": "a", "completion": "b"}], "dpo", r"objective 'dpo' needs rows of format"),
        ([{"txt": "a"}], None, r"cannot detect the format"),
        ([{"prompt": ""}], "grpo", r"row 0: field 'prompt': empty text"),
    ],
)
def test_malformed_rows_name_source_row_field(tok, rows, objective, match):
    with pytest.raises(DataError, match=match) as info:
        build_dataset(rows, tok, objective=objective)
    assert str(info.value).startswith("<inline rows>")


def test_error_names_the_file(tok, tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": null}\n')
    with pytest.raises(DataError, match=r"train\.jsonl: row 1: field 'completion'") as info:
        build_dataset(p, tok)
    assert (info.value.row, info.value.field) == (1, "completion")


def test_overlong_policies(tok):
    rows = [{"prompt": "ab", "completion": "c" * 3}, {"prompt": "ab", "completion": "c" * 20}]
    opts = dict(max_length=10)
    t = build_dataset(rows, tok, options=EncodeOptions(**opts, overlong="truncate"))
    assert [len(e["tokens"]) for e in t.examples] == [7, 10]
    assert t.stats.truncated == 1 and t.stats.dropped_overlong == 0
    d = build_dataset(rows, tok, options=EncodeOptions(**opts, overlong="drop"))
    assert len(d) == 1 and d.stats.dropped_overlong == 1 and d.stats.dropped_rows == [1]
    assert "1 dropped as over-long" in d.summary()
    with pytest.raises(DataError, match=r"row 1: field 'completion': 24 tokens exceed data\.max_length=10"):
        build_dataset(rows, tok, options=EncodeOptions(**opts, overlong="fail"))
    # a prompt filling the whole budget leaves nothing to learn: counted as dropped even under truncate
    long_prompt = [{"prompt": "a" * 30, "completion": "b"}, rows[0]]
    t2 = build_dataset(long_prompt, tok, options=EncodeOptions(**opts))
    assert len(t2) == 1 and t2.stats.dropped_overlong == 1
    with pytest.raises(DataError, match="no usable rows"):
        build_dataset(long_prompt[:1], tok, options=EncodeOptions(**opts))


def test_preference_truncation_keeps_prompt_end_and_completion_start(tok):
    row = {"prompt": "abcdefgh", "chosen": "ABCDEFGH", "rejected": "xy"}
    opts = EncodeOptions(
        max_prompt_length=4, max_completion_length=3, max_length=7, add_bos=False, add_eos=False
    )
    ex = build_dataset([row], tok, objective="dpo", options=opts).examples[0]
    assert tok.decode(ex["chosen_tokens"]) == "efghABC"
    assert ex["chosen_loss_mask"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert tok.decode(ex["rejected_tokens"]) == "efghxy"
    with pytest.raises(DataError, match=r"row 0: field 'prompt': 9 tokens exceed data\.max_prompt_length=4"):
        build_dataset(
            [row], tok, objective="dpo", options=EncodeOptions(max_prompt_length=4, overlong="fail")
        )
    fail = EncodeOptions(max_completion_length=5, overlong="fail")
    with pytest.raises(DataError, match=r"field 'chosen': 9 tokens exceed data\.max_completion_length=5"):
        build_dataset([row], tok, objective="dpo", options=fail)


def test_ranked_rows_expand_to_ordered_pairs(tok):
    row = {"prompt": "q", "completions": ["mid", "worst", "best"], "ranking": [2, 0, 1]}
    ds = build_dataset(
        [row, row], tok, objective="reward", options=EncodeOptions(add_bos=False, add_eos=False)
    )
    assert ds.format == "ranked" and len(ds) == 6
    decoded = [
        (tok.decode(e["chosen_tokens"][1:]), tok.decode(e["rejected_tokens"][1:])) for e in ds.examples[:3]
    ]
    assert decoded == [("best", "mid"), ("best", "worst"), ("mid", "worst")]
    assert [e["group"] for e in ds.examples] == [0, 0, 0, 1, 1, 1]


def test_margin_column(tok):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "m": 2}]
    ds = build_dataset(rows, tok, objective="reward", options=EncodeOptions(margin_column="m"))
    assert ds.examples[0]["margin"] == 2.0
    with pytest.raises(DataError, match=r"row 0: field 'nope'"):
        build_dataset(rows, tok, objective="reward", options=EncodeOptions(margin_column="nope"))


def test_prompt_only_keeps_extra_columns(tok):
    rows = [{"prompt": "1+1=", "answer": "2", "meta": {"k": 1}}]
    ds = build_dataset(rows, tok, objective="grpo")
    ex = ds.examples[0]
    assert (
        ds.kind == "prompt" and ex["prompt"] == "1+1=" and ex["columns"] == {"answer": "2", "meta": {"k": 1}}
    )
    assert ex["prompt_tokens"].tolist() == [tok.bos_token_id] + ids(tok, "1+1=")
    # prompt/completion data used for GRPO: prompt-only, the completion is passed through as a column
    ds2 = build_dataset([{"prompt": "a", "completion": "b"}], tok, objective="grpo")
    assert ds2.examples[0]["columns"] == {"completion": "b"}


CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_chat_assistant_only_mask(tok):
    tokens, mask = encode_chat(tok, CHAT)
    assert tok.decode(tokens) == tok.apply_chat_template(CHAT, tokenize=False)
    # masked tokens are exactly the assistant contents and their end-of-turn tokens
    assert tok.decode(tokens[mask == 1]) == "hello<eos>4<eos>"
    ds = build_dataset([{"messages": CHAT}], tok, objective="sft")
    assert ds.format == "messages"
    np.testing.assert_array_equal(ds.examples[0]["loss_mask"], mask)


def test_chat_mask_without_generation_prompt_support():
    # A template that ignores add_generation_prompt and renders "role: content\n" with no special markers.
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    tok = train_tokenizer(alphabet=string.ascii_letters + string.digits + " :?\n+", chat_template=template)
    tokens, mask = encode_chat(tok, CHAT)
    trained = tok.decode(tokens[mask == 1])
    assert trained == "assistant: hello\nassistant: 4\n"  # header included, user turns never trained
    assert "hi" not in trained and "be brief" not in trained


def test_conversational_preference_and_prompt(tok):
    row = {
        "prompt": CHAT[:2],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    ex = build_dataset([row], tok, objective="dpo").examples[0]
    assert tok.decode(ex["chosen_tokens"][ex["chosen_loss_mask"] == 1]) == "good<eos>"
    assert tok.decode(ex["rejected_tokens"][ex["rejected_loss_mask"] == 1]) == "bad<eos>"
    p = build_dataset([{"prompt": CHAT[:2]}], tok, objective="grpo").examples[0]
    assert tok.decode(p["prompt_tokens"]).endswith("<|user|>hi<eos><|assistant|>")


def test_chat_mask_fallback_when_prefixes_do_not_match():
    # This template closes a conversation that ends with an assistant turn with "<end>", so the rendering up
    # to the first assistant turn is not a prefix of the whole: that span falls back to locating the content.
    # The last turn's prefix rendering is the whole text, so its span comes from prefixes (header included,
    # as the template has no generation prompt).
    template = (
        "{% for m in messages %}{{ m['role'] + ':' + m['content'] + ';' }}{% endfor %}"
        "{% if messages[-1]['role'] == 'assistant' %}<end>{% endif %}"
    )
    tok = train_tokenizer(alphabet=string.ascii_letters + string.digits + " :;?+<>", chat_template=template)
    tokens, mask = encode_chat(tok, CHAT)
    assert tok.decode(tokens).endswith("assistant:4;<end>")
    assert tok.decode(tokens[mask == 1]) == "hello" + "assistant:4;<end>"


def test_preference_pairs_with_chosen_equal_rejected_are_counted_and_reported(tok):
    rows = [
        {"prompt": "ab", "chosen": "c", "rejected": "d"},
        {"prompt": "ab", "chosen": "cd", "rejected": "cd"},
        {"prompt": "ba", "chosen": "e", "rejected": "e"},
    ]
    ds = build_dataset(rows, tok)
    assert len(ds) == 3  # kept: they are the user's rows
    assert ds.stats.identical_pairs == 2 and ds.stats.identical_rows == [1, 2]
    assert "2 pairs with chosen == rejected" in ds.summary()
