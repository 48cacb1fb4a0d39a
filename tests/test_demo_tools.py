"""``jrft demo --objective tools``: the multiplication task, its calc tool, and the quick run end to end."""

import json

import pytest

from jrft.demo.tools_task import (
    MultiplicationTask,
    calc,
    sft_rows,
    tool_call_text,
    tools_tokenizer,
    write_tool_task_files,
)


def test_calc_evaluates_integer_arithmetic_and_refuses_the_rest():
    assert calc("123*456") == "56088" and calc(" (7-10)*2 + 9//2 ") == "-2"
    for bad in ("__import__('os')", "2**100", "1.5*2", "x*2", "9" * 70):
        with pytest.raises((ValueError, SyntaxError)):
            calc(bad)


def test_splits_are_disjoint_and_rows_mix_tool_use_with_direct_answers(tmp_path):
    task = MultiplicationTask()
    train, heldout = task.sample(300, seed=1), task.sample(100, split="heldout", seed=1)
    assert len(set(train)) == 300 and not set(train) & set(heldout)
    assert all(100 <= a < 1000 and 100 <= b < 1000 for a, b in train)
    rows = sft_rows(train, tool_fraction=0.5, seed=1)
    used = [r["used_tool"] for r in rows]
    assert 0.35 < sum(used) / len(used) < 0.65
    a, b = train[0]
    for r in rows:
        m = r["messages"]
        assert m[-1]["role"] == "assistant" and m[-1]["content"].startswith("<answer>")
        if r["used_tool"]:
            assert [x["role"] for x in m] == ["user", "assistant", "tool", "assistant"]
    assert json.loads(tool_call_text(a, b)[len("<tool_call>") : -len("</tool_call>")]) == {
        "name": "calc",
        "arguments": {"expression": f"{a}*{b}"},
    }
    files = write_tool_task_files(
        tmp_path, num_sft=20, num_rl_prompts=30, num_heldout=10, tool_fraction=1.0, seed=0
    )
    prompts = [json.loads(x) for x in open(files["prompts_train"])]
    sft = [json.loads(x) for x in open(files["sft_train"])]
    assert len(prompts) == 30 and len(sft) == 20 and all(r["used_tool"] for r in sft)
    assert {r["prompt"] for r in prompts}.isdisjoint({r["messages"][0]["content"] for r in sft})


def test_the_tokenizer_renders_a_tool_trace_losslessly():
    tok = tools_tokenizer()
    messages = sft_rows([(123, 456)], tool_fraction=1.0, seed=0)[0]["messages"]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert "<|tool|>56088<eos>" in text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text


def test_quick_tools_demo_runs_sft_and_multiturn_grpo(tmp_path, capsys):
    from jrft.commands.demo import main

    out = tmp_path / "tools"
    assert main(["--quick", "--no-progress", "--objective", "tools", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out tool-call rate" in text and "held-out exact match" in text
    result = json.loads((out / "result.json").read_text())
    assert {"accuracy", "tool_call_rate", "tool_failure_rate"} <= set(result["before"])
    assert {"accuracy", "tool_call_rate", "final_accuracy"} <= set(result["after"])
    assert [e[0] for e in result["evals"]] == [0, 1, 2]
    rows = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert any("agent/tool_call_rate" in r for r in rows) and any("eval/tool_call_rate" in r for r in rows)
    table = [json.loads(x) for x in (out / "grpo" / "completions.jsonl").read_text().splitlines()]
    assert table and all("turns" in t for t in table)
    assert (out / "grpo" / "export" / "config.json").is_file() and (out / "report.png").is_file()
