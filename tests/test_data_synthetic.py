"""The synthetic addition task: correct traces, disjoint splits, preference corruptions, tokenizer."""

import json
import re

import pytest

from jrft.data import build_dataset
from jrft.data.synthetic import (
    ALPHABET,
    DEFAULT_REJECTION_KINDS,
    TAGS,
    AdditionTask,
    addition_trace,
    arithmetic_tokenizer,
    extract_answer,
    is_well_formatted,
    preference_rows,
    write_task_files,
)

STEP = re.compile(r"(\d)\+(\d)\+(\d)=(\d\d)")


def check_trace(a: int, b: int, completion: str, num_digits: int) -> None:
    """Re-derives the answer from the trace's own steps, independently of the generator."""
    think = completion.split("<think>")[1].split("</think>")[0]
    steps = [tuple(map(int, m.groups())) for m in map(STEP.fullmatch, think.split(","))]
    assert len(steps) == num_digits
    carry, digits = 0, []
    for k, (x, y, c, s) in enumerate(steps):
        assert (x, y) == ((a // 10**k) % 10, (b // 10**k) % 10)
        assert c == carry and s == x + y + c
        carry = s // 10
        digits.append(s % 10)
    value = carry * 10**num_digits + sum(d * 10**k for k, d in enumerate(digits))
    assert value == a + b and extract_answer(completion) == str(a + b)


def test_reference_example():
    assert addition_trace(123, 456) == "<think>3+6+0=09,2+5+0=07,1+4+0=05</think><answer>579</answer>"
    assert addition_trace(999, 999) == "<think>9+9+0=18,9+9+1=19,9+9+1=19</think><answer>1998</answer>"


@pytest.mark.parametrize("num_digits", [1, 2, 3, 5])
def test_traces_are_correct_for_many_seeds(num_digits):
    task = AdditionTask(num_digits=num_digits)
    n = 15 if num_digits == 1 else 50
    for seed in range(20):
        for p in task.sample(n, seed=seed):
            assert p.prompt == f"{p.a}+{p.b}=" and len(str(p.a)) == len(str(p.b)) == num_digits
            assert is_well_formatted(p.completion)
            check_trace(p.a, p.b, p.completion, num_digits)


def test_splits_are_disjoint_and_seeded():
    task = AdditionTask()
    train = {(p.a, p.b) for s in range(5) for p in task.sample(400, split="train", seed=s)}
    held = {(p.a, p.b) for s in range(5) for p in task.sample(400, split="heldout", seed=s)}
    assert not train & held
    assert all(task.is_heldout(a, b) for a, b in held) and not any(task.is_heldout(a, b) for a, b in train)
    one = task.sample(100, seed=3)
    assert one == task.sample(100, seed=3) and one != task.sample(100, seed=4)
    assert len({(p.a, p.b) for p in one}) == 100  # distinct
    with pytest.raises(ValueError, match="distinct"):
        AdditionTask(num_digits=1).sample(50, split="heldout")


def test_preference_rows_reject_wrong_or_broken_answers():
    problems = AdditionTask().sample(300, seed=0)
    rows = preference_rows(problems, seed=0)
    assert len(rows) == 300
    assert {r["rejected_kind"] for r in rows} == set(DEFAULT_REJECTION_KINDS)  # every default kind occurs
    for p, r in zip(problems, rows, strict=True):
        assert r["chosen"] == p.completion and r["rejected"] != r["chosen"]
        correct = extract_answer(r["rejected"]) == p.answer
        assert not (correct and is_well_formatted(r["rejected"]))  # wrong answer or broken format
        if r["rejected_kind"] in ("dropped_carry", "wrong_digit"):
            assert is_well_formatted(r["rejected"]) and not correct
        else:
            assert not is_well_formatted(r["rejected"])
    only = preference_rows(problems[:20], seed=0, kinds=["no_think"])
    assert all(r["rejected"] == f"<answer>{p.answer}</answer>" for p, r in zip(problems, only, strict=False))


@pytest.mark.parametrize("kind", ["miscopied_operand", "wrong_column_sum"])
def test_single_step_slips_give_a_consistent_trace_with_a_wrong_answer(kind):
    """One step is wrong (an operand digit or a column sum); every later step and the answer follow from
    the written steps, so only a reader who checks that step against the prompt can tell."""
    problems = AdditionTask().sample(200, seed=1)
    rows = preference_rows(problems, seed=1, kinds=[kind])
    for p, r in zip(problems, rows, strict=True):
        rejected = r["rejected"]
        assert r["rejected_kind"] == kind and is_well_formatted(rejected)
        assert extract_answer(rejected) != p.answer
        think = rejected.split("<think>")[1].split("</think>")[0]
        steps = [tuple(map(int, m.groups())) for m in map(STEP.fullmatch, think.split(","))]
        carry, answer = 0, 0
        for k, (_, _, c, s) in enumerate(steps):
            assert c == carry  # carries follow the written sums
            answer += (s % 10) * 10**k
            carry = s // 10
        assert int(extract_answer(rejected)) == answer + carry * 10 ** len(steps)
        columns = [((p.a // 10**k) % 10, (p.b // 10**k) % 10) for k in range(3)]
        copied = [(x, y) for x, y, _, _ in steps]
        wrong_sums = [k for k, (x, y, c, s) in enumerate(steps) if s != x + y + c]
        if kind == "miscopied_operand":  # one operand digit differs, every sum is right for what was written
            digits = [d for col in columns for d in col]
            assert sum(a != b for a, b in zip(digits, [d for c in copied for d in c], strict=True)) == 1
            assert wrong_sums == []
        else:  # the operands are copied right, exactly one column sum is off (by 1 or 2)
            assert copied == columns and len(wrong_sums) == 1
            x, y, c, s = steps[wrong_sums[0]]
            assert abs(s - (x + y + c)) in (1, 2)


def test_tokenizer_has_one_token_per_symbol_and_tag():
    tok = arithmetic_tokenizer()
    text = "123+456=" + addition_trace(123, 456)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(ids)
    assert all(len(p) == 1 or p in TAGS for p in pieces)
    assert len(ids) == 8 + 26 + 4 + 3  # prompt, 3 steps of 8 + 2 commas, 4 tags, 3 answer digits
    assert tok.unk_token_id not in ids
    assert all(tok.convert_tokens_to_ids(t) != tok.unk_token_id for t in list(ALPHABET) + list(TAGS))
    assert None not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def test_written_files_feed_every_objective(tmp_path):
    paths = write_task_files(tmp_path, num_train=30, num_heldout=10, num_rl_prompts=40, seed=1)
    rows = [json.loads(line) for line in open(paths["prompts_train"])]
    assert len(rows) == 40 and set(rows[0]) == {"prompt", "answer"}
    sft_prompts = {json.loads(line)["prompt"] for line in open(paths["sft_train"])}
    assert not sft_prompts & {r["prompt"] for r in rows}  # RL prompts are fresh problems
    tok = arithmetic_tokenizer()
    for key, objective, fmt in [
        ("sft_train", "sft", "prompt_completion"),
        ("pref_train", "dpo", "preference"),
        ("pref_heldout", "reward", "preference"),
        ("prompts_train", "grpo", "prompt_only"),
    ]:
        ds = build_dataset(paths[key], tok, objective=objective)
        assert ds.format == fmt and len(ds) > 0
    sft = build_dataset(paths["sft_train"], tok, objective="sft")
    ex = sft.examples[0]
    text = tok.decode(ex["tokens"][ex["loss_mask"] == 1])
    assert text.startswith("<think>") and text.endswith("</answer><eos>")
