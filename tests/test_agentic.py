"""Multi-turn rollouts (jrft.agentic): tool-call parsing, tool execution with failure isolation, trajectories
whose loss mask covers the model's tokens only and whose sampler log-probs equal teacher forcing, and GRPO
runs with tools and with an environment (TRL-shaped tool and reward functions unchanged)."""

import json
import os
import time

import jax
import numpy as np
import pytest
from flax import nnx

from jrft.agentic import ToolBox, ToolCall, get_parser, load_environment, parse_hermes
from jrft.agentic.agent import make_agent
from jrft.agentic.rollout import AgentSettings, environment_tokens, sample_multiturn, score_multiturn
from jrft.train.logprobs import make_completion_forward
from jrft.train.rollout import SamplingSettings
from jrft.train.state import split_model

# The shape of TRL's documented GRPOTrainer(tools=[...]) example: a typed function with a Google docstring,
# and a reward function reading conversational completions (lists of messages).
USER_CODE = '''
import time


def multiply(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product of the two integers.
    """
    return a * b


def sleepy(seconds: float) -> str:
    """
    Sleeps, then says so.

    Args:
        seconds: How long to sleep.
    """
    time.sleep(seconds)
    return "awake"


def broken(x: int) -> int:
    """
    Always raises.

    Args:
        x: Anything.
    """
    raise RuntimeError("broken tool")


def always_multiply(text):
    """A tool-call parser that reads a call in every turn (so a random model exercises the tool path)."""
    from jrft.agentic import ToolCall

    return [ToolCall("multiply", {"a": 6, "b": 7})]


def correctness_reward(completions, answer, **kwargs):
    rewards = []
    for completion, ans in zip(completions, answer):
        guess = completion[-1]["content"].strip()
        rewards.append(1.0 if guess == str(ans) else 0.0)
    return rewards


def saw_the_tool(completions, **kwargs):
    return [float(any(m["role"] == "tool" and m["content"] == "42" for m in c)) for c in completions]


def calls_on_a_one(text):
    """Calls multiply in the turns that hold a '1' (trajectories differ in turns and calls); each call of the
    parser is logged per JAX process, with the text, next to this file."""
    import json
    import os

    import jax

    from jrft.agentic import ToolCall

    log = os.path.join(os.path.dirname(__file__), f"parsed{jax.process_index()}.jsonl")
    with open(log, "a") as f:
        f.write(json.dumps(text) + "\\n")
    return [ToolCall("multiply", {"a": 6, "b": 7})] if "1" in text else []


def ones_in_turns(completions, **kwargs):
    """Fraction of '1' characters in the model's turns: a reward spread within groups."""
    texts = ["".join(m["content"] for m in c if m["role"] == "assistant") for c in completions]
    return [t.count("1") / max(len(t), 1) for t in texts]


class EndsOn12:
    """'go' after each of the model's turns up to 3 turns; an episode of a prompt starting with '12' ends
    after its first turn (in the two-process test, process 1's rows finish while process 0's go on)."""

    def reset(self, row):
        self.prompt, self.turns = row["prompt"], 0
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, text):
        self.turns += 1
        reward = text.count("1") / max(len(text), 1)
        if self.prompt.startswith("12") or self.turns >= 3:
            return None, reward, True
        return [{"role": "user", "content": "go"}], reward, False


class CountingGame:
    """Says 'go' after each of the model's first two turns; the reward of a turn is its fraction of '1's."""

    def reset(self, row):
        self.turns = 0
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, text):
        self.turns += 1
        reward = text.count("1") / max(len(text), 1)
        if self.turns >= 3:
            return None, reward, True
        return [{"role": "user", "content": "go"}], reward, False
'''

ALPHABET = '0123456789+-*=,.{}[]":abcdefghijklmnopqrstuvwxyz _'


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from jrft.data import synthetic
    from jrft.data.local_tokenizer import DEFAULT_SPECIAL_TOKENS, train_tokenizer
    from jrft.models import Decoder, ModelConfig, save_pretrained
    from jrft.models.testing import tiny_hf_config

    root = tmp_path_factory.mktemp("agentic")
    tokenizer = train_tokenizer(
        kind="char",
        alphabet=ALPHABET,
        special_tokens=(*DEFAULT_SPECIAL_TOKENS, "<|tool|>"),
        added_tokens=("<tool_call>", "</tool_call>"),
    )
    cfg = tiny_hf_config(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Decoder(ModelConfig.from_hf(cfg), rngs=nnx.Rngs(0))
    code = root / "user_code.py"
    code.write_text(USER_CODE)
    rows = [{"prompt": f"{a}*{b}=", "answer": str(a * b)} for a, b in [(6, 7), (12, 3), (5, 5), (9, 8)] * 4]
    return {
        "root": root,
        "tokenizer": tokenizer,
        "model": model,
        "model_dir": save_pretrained(model, root / "model", tokenizer),
        "code": str(code),
        "prompts": synthetic.write_jsonl(rows, root / "prompts.jsonl"),
    }


def test_hermes_parser_reads_calls_and_reports_bad_ones():
    text = (
        'I will call <tool_call>{"name": "multiply", "arguments": {"a": 2, "b": 3}}</tool_call> and '
        '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call><tool_call>{oops</tool_call>'
    )
    calls = parse_hermes(text)
    assert calls[0] == ToolCall("multiply", {"a": 2, "b": 3})
    assert calls[1] == ToolCall("f", {"x": 1})
    assert calls[2].error is not None and "JSON" in calls[2].error
    assert parse_hermes("no call here") == []
    assert parse_hermes('<tool_call>{"name": "g"}')[0] == ToolCall("g", {})  # unclosed, no arguments
    assert get_parser("hermes") is parse_hermes


def test_toolbox_schemas_results_and_isolated_failures(task):
    spec = task["code"]
    box = ToolBox(
        [
            {"spec": f"{spec}:multiply"},
            {"spec": f"{spec}:sleepy"},
            {"spec": f"{spec}:broken"},
            {"name": "python"},
        ],
        timeout=3.0,
    )
    try:
        schema = box.schemas[0]["function"]
        assert schema["name"] == "multiply" and schema["parameters"]["required"] == ["a", "b"]
        assert schema["parameters"]["properties"]["a"]["type"] == "integer"
        t0 = time.monotonic()
        results = box.run(
            [
                ToolCall("multiply", {"a": 6, "b": 7}),
                ToolCall("sleepy", {"seconds": 30}),  # hangs: its worker is killed at the timeout
                ToolCall("broken", {"x": 1}),
                ToolCall("nope", {}),
                ToolCall("multiply", {"a": 1}),  # a missing argument
                ToolCall("", {}, error="the tool call is not valid JSON"),
                ToolCall("python", {"code": "print(2**10)"}),
            ]
        )
        assert time.monotonic() - t0 < 15
        texts = [text for text, _ in results]
        assert [ok for _, ok in results] == [True, False, False, False, False, False, True], texts
        assert texts[0] == "42" and texts[6] == "1024"
        assert "within 3 s" in texts[1] and "broken tool" in texts[2] and "unknown tool" in texts[3]
        assert box.calls == 7 and box.failures == 5
        assert box.run([ToolCall("multiply", {"a": 2, "b": 2})]) == [("4", True)]  # the pool recovered
    finally:
        box.close()


def _batch(n_prompts=2):
    prompts = ["6*7=", "12*3="][:n_prompts]
    return {"prompts": prompts, "columns": {"answer": ["42", "36"][:n_prompts]}}


def _settings(task, max_new_tokens=48, g=2):
    return SamplingSettings(g, max_new_tokens, 1.0, None, None, task["tokenizer"].pad_token_id)


def _teacher_forcing(task, rollout):
    graphdef, params, rest = split_model(task["model"])
    forward = make_completion_forward(graphdef, temperature=1.0)
    batch = {
        k: jax.numpy.asarray(getattr(rollout, k)) for k in ("tokens", "attention_mask", "completion_mask")
    }
    return np.asarray(forward(params, rest, batch)["logps"])


def _env_runs(rollout, r):
    """The continuation's runs of environment tokens (mask 0) of row ``r``, as lists of ids."""
    ids, mask = rollout.completion_ids[r], rollout.completion_mask[r, : len(rollout.completion_ids[r])]
    runs, cur = [], []
    for t, m in zip(ids, mask, strict=True):
        if m:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(t)
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("kv_cache", [True, False], ids=["kv_cache", "reprefill"])
def test_environment_trajectories_mask_env_tokens_and_match_teacher_forcing(task, kv_cache):
    game = load_environment(f"{task['code']}:CountingGame")
    agent = AgentSettings(game, max_turns=3, kv_cache=kv_cache)
    rollout = sample_multiturn(
        task["model"], _batch(), task["tokenizer"], _settings(task), agent, rng=jax.random.key(3)
    )
    n = rollout.num_rows
    assert n == 4 and rollout.tokens.shape == (n, rollout.prompt_length + rollout.completion_mask.shape[1])
    assert rollout.prompts[0] == rollout.prompts[1] == [{"role": "user", "content": "6*7="}]
    tok = task["tokenizer"]
    for r in range(n):
        convo, turns = rollout.completions[r], rollout.turns[r]
        assert [m["role"] for m in convo][:1] == ["assistant"]
        assert len(turns) == sum(m["role"] == "assistant" for m in convo) <= 3
        # the environment's tokens are its messages rendered by the chat template, after each model turn
        expected, history = [], list(rollout.prompts[r])
        for k, m in enumerate(convo):
            if m["role"] == "user":
                continue
            history.append(m)
            nxt = [x for x in convo[k + 1 :]][:1]
            if nxt and nxt[0]["role"] == "user":
                expected.append(environment_tokens(tok, history, nxt, None))
                history.append(nxt[0])
        assert _env_runs(rollout, r) == expected
        if not rollout.truncated[r]:  # a finished game: 3 rewarded turns
            assert len(turns) == 3 and all("reward" in t for t in turns)
            assert rollout.env_rewards[r] == pytest.approx(sum(t["reward"] for t in turns))
    assert rollout.completion_mask.sum() < (rollout.attention_mask[:, rollout.prompt_length :]).sum()
    # sampler log-probs of every model token == a forward over the final sequence (teacher forcing)
    logps = _teacher_forcing(task, rollout)
    mask = rollout.completion_mask.astype(bool)
    np.testing.assert_allclose(logps[mask], rollout.sampler_logps[mask], atol=2e-4)
    scored = score_multiturn(rollout, None)  # the environment alone rewards
    np.testing.assert_allclose(scored.rewards, rollout.env_rewards)
    assert scored.reward_metrics["agent/turns_mean"] > 1


def test_tool_trajectories_carry_results_and_trl_rewards_read_them(task):
    from jrft.rewards import RewardRunner

    spec = task["code"]
    agent, box = make_agent(
        tools=[{"spec": f"{spec}:multiply"}], parser=f"{spec}:always_multiply", max_turns=2
    )
    try:
        assert agent.tool_schemas[0]["function"]["name"] == "multiply"
        rollout = sample_multiturn(
            task["model"], _batch(), task["tokenizer"], _settings(task, 64), agent, rng=jax.random.key(0)
        )
        runner = RewardRunner([f"{spec}:correctness_reward", f"{spec}:saw_the_tool"])
        rollout = score_multiturn(rollout, runner)
    finally:
        box.close()
    answered = [r for r in range(rollout.num_rows) if len(rollout.turns[r]) == 2]  # a 2nd turn: the tool ran
    assert answered
    for r in answered:
        first = rollout.turns[r][0]
        assert first["tool_calls"] == [{"name": "multiply", "arguments": {"a": 6, "b": 7}}]
        assert first["environment"] == [{"role": "tool", "name": "multiply", "content": "42"}]
        assert rollout.completions[r][0]["tool_calls"][0]["function"]["name"] == "multiply"
        assert rollout.completions[r][1] == {"role": "tool", "name": "multiply", "content": "42"}
        assert rollout.per_function["saw_the_tool"][r] == 1.0
    assert rollout.reward_metrics["agent/tool_call_rate"] == len(answered) / rollout.num_rows
    assert rollout.reward_metrics["agent/tool_failures"] == 0.0
    mask = rollout.completion_mask.astype(bool)
    np.testing.assert_allclose(_teacher_forcing(task, rollout)[mask], rollout.sampler_logps[mask], atol=2e-4)


def _grpo_config(task, out, *extra):
    from jrft.config import load_config

    return load_config(
        None,
        [
            "objective=grpo",
            f"output_dir={out}",
            f"model.path={task['model_dir']}",
            f"data.train={task['prompts']}",
            "data.format=prompt_only",
            "optim.lr=1e-3",
            "train.batch_size=2",
            "train.steps=2",
            "train.log_every=1",
            "train.save_every=0",
            "grpo.num_generations=2",
            "grpo.max_new_tokens=48",
            "grpo.max_turns=2",
            "grpo.log_completions_every=1",
            *extra,
        ],
    )


def _metrics(out):
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if '"eval/' not in x]


@pytest.mark.slow  # ~15 s; GRPO with tools runs in the default suite in test_demo_tools' quick demo
def test_grpo_run_with_tools_logs_turns_and_counts_failures(task, tmp_path):
    from jrft.train.runs import run_config

    spec, out = task["code"], tmp_path / "tools"
    run_config(
        _grpo_config(
            task,
            out,
            f"grpo.tools=[{{spec: '{spec}:multiply'}}, {{spec: '{spec}:broken'}}]",
            f"grpo.tool_parser={spec}:always_multiply",
            f"grpo.reward_functions=[{{spec: '{spec}:saw_the_tool'}}]",
            "grpo.loss_aggregation=grpo",
            "grpo.num_iterations=2",
        ),
        progress=False,
    )
    rows = _metrics(out)
    assert len(rows) == 2 and all(r["agent/tool_call_rate"] > 0 for r in rows)
    assert all(np.isfinite(r["loss"]) for r in rows)
    table = [json.loads(x) for x in open(out / "completions.jsonl")]
    called = [t for t in table if "tool_calls" in t["turns"][0]]
    assert called and all(t["turns"][0]["tool_calls"][0]["name"] == "multiply" for t in called)
    assert isinstance(table[0]["completion"], list) and table[0]["completion"][0]["role"] == "assistant"


def test_grpo_run_with_an_environment_and_no_reward_function(task, tmp_path):
    from jrft.train.runs import run_config

    out = tmp_path / "env"
    run_config(
        _grpo_config(task, out, f"grpo.environment={task['code']}:CountingGame", "grpo.max_turns=3"),
        progress=False,
    )
    rows = _metrics(out)
    assert len(rows) == 2 and all("rewards/environment/mean" in r for r in rows)
    assert all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.slow
def test_grpo_variants_run_on_multi_turn_rollouts(task, tmp_path):
    """DAPO dynamic sampling, a KL to the reference, GSPO sequence ratios, mu = 2 with the sampler's old
    log-probs (~15 s idle, 40 s on a loaded 2-core machine: slow suite)."""
    from jrft.train.runs import run_config

    out = tmp_path / "env"
    variants = [
        "grpo.dynamic_sampling=true",
        "grpo.max_sampling_rounds=2",
        "grpo.beta=0.04",
        "grpo.importance_level=sequence",
        "grpo.num_iterations=2",
        "grpo.old_logprobs=sampler",
    ]
    game = f"grpo.environment={task['code']}:CountingGame"
    config = _grpo_config(task, out, game, "grpo.max_turns=3", "grpo.max_new_tokens=96", *variants)
    run_config(config, progress=False)
    rows = _metrics(out)
    assert len(rows) == 2 and all("rewards/environment/mean" in r for r in rows)
    trained = [r for r in rows if "loss" in r]  # dynamic sampling may find no group with signal (skipped)
    assert trained and all(np.isfinite(r["loss"]) and r["ref_logps_computed"] == 1.0 for r in trained)
    assert all(r["agent/turns_mean"] > 1 for r in trained)


def test_config_checks_the_agentic_fields():
    from jrft.config import ConfigError, load_config

    base = ["objective=grpo", "grpo.reward_functions=[{name: format}]"]
    with pytest.raises(ConfigError, match="environment"):
        load_config(None, [*base, "grpo.tools=[{name: python}]", "grpo.environment=env.py:Env"])
    with pytest.raises(ConfigError, match="max_turns"):
        load_config(None, [*base, "grpo.max_turns=0"])
    with pytest.raises(ConfigError, match="tools"):
        load_config(None, [*base, "grpo.tools=[{name: python, spec: a.py:f}]"])
    config = load_config(None, ["objective=grpo", "grpo.environment=env.py:Env"])  # rewards from the env
    assert config.grpo.environment == "env.py:Env" and config.grpo.tools == ()


def test_kv_session_rebuilds_when_out_of_slots_and_still_matches_teacher_forcing(task):
    from jrft.sampling.session import Session

    tok = task["tokenizer"]
    session = Session(
        task["model"], 3, 64, max_new_tokens=12, stop_token_ids=(), rng=jax.random.key(1)
    )  # no stop: full turns
    sampled = [[] for _ in range(3)]  # (index in the sequence, log-prob) of every sampled token
    chunks = [[1, 10, 11], [1, 12], [1, 13, 14, 15]]
    for turn in range(4):
        before = [len(s) + len(c) for s, c in zip(session.sequences, chunks, strict=True)]
        out = session.turn(chunks, [True, turn != 1, True], [12, 12, 12])
        for r in range(3):
            for j in range(int(out.lengths[r])):
                sampled[r].append((before[r] + j, float(out.logprobs[r, j])))
        chunks = [[20 + turn, 21], [22], []]  # environment tokens for the next turn
    assert session.rebuilds >= 1  # 64 slots cannot hold 4 turns of chunks + 12-token buckets
    assert len(sampled[1]) == 3 * 12 and len(sampled[0]) == 4 * 12
    width = max(len(s) for s in session.sequences)
    tokens = np.full((3, width), tok.pad_token_id, np.int32)
    attention = np.zeros((3, width), np.int32)
    mask = np.zeros((3, width - 1), np.int32)
    expected = np.zeros((3, width - 1), np.float32)
    for r, seq in enumerate(session.sequences):
        tokens[r, : len(seq)], attention[r, : len(seq)] = seq, 1
        for index, logp in sampled[r]:
            mask[r, index - 1], expected[r, index - 1] = 1, logp
    graphdef, params, rest = split_model(task["model"])
    forward = make_completion_forward(graphdef, temperature=1.0)
    batch = {"tokens": tokens, "attention_mask": attention, "completion_mask": mask}
    logps = np.asarray(forward(params, rest, {k: jax.numpy.asarray(v) for k, v in batch.items()})["logps"])
    np.testing.assert_allclose(logps[mask > 0], expected[mask > 0], atol=2e-4)


QWEN_LIKE = (
    "{{ bos_token }}"
    "{%- if tools %}<|system|>tools:{% for t in tools %} {{ t.function.name }}{% endfor %}{{ eos_token }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|user|><tool_response>{{ m.content }}</tool_response>{{ eos_token }}"
    "{%- else %}{{ '<|' + m.role + '|>' + m.content + eos_token }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_tool_schemas_reach_the_template_and_tool_messages_render_through_it(task):
    from jrft.agentic.rollout import encode, render
    from jrft.data.local_tokenizer import CHAT_ROLE_TOKENS, DEFAULT_SPECIAL_TOKENS, train_tokenizer

    tok = train_tokenizer(
        kind="char",
        alphabet=ALPHABET + "<>/|",
        special_tokens=(*DEFAULT_SPECIAL_TOKENS, *CHAT_ROLE_TOKENS),
        chat_template=QWEN_LIKE,
    )
    box = ToolBox([{"spec": f"{task['code']}:multiply"}, {"name": "python"}])
    try:
        prompt = [{"role": "user", "content": "6*7="}]
        text = render(tok, prompt, box.schemas, add_generation_prompt=True)
        assert text.startswith("<bos><|system|>tools: multiply python<eos>") and text.endswith(
            "<|assistant|>"
        )
        turn = {"role": "assistant", "content": '<tool_call>{"name": "multiply"}</tool_call>'}
        extra = environment_tokens(tok, [*prompt, turn], [{"role": "tool", "content": "42"}], box.schemas)
        assert tok.decode(extra) == "<|user|><tool_response>42</tool_response><eos><|assistant|>"
        assert extra == encode(tok, "<|user|><tool_response>42</tool_response><eos><|assistant|>")
    finally:
        box.close()


MULTIHOST_CONFIG = """\
objective: grpo
seed: 0
model: {{path: {model}}}
data: {{train: {prompts}, format: prompt_only}}
optim: {{lr: 3.0e-3, schedule: constant, warmup_steps: 0}}
train: {{steps: 2, batch_size: 4, log_every: 1, save_every: 0}}
mesh: {{data: 2, fsdp: 4, tensor: 1}}
grpo:
  num_generations: 2
  max_new_tokens: 48
  max_turns: 2
  beta: 0.04
  log_completions_every: 1
  tools: [{{spec: '{code}:multiply'}}]
  tool_parser: '{code}:calls_on_a_one'
  reward_functions: [{{spec: '{code}:ones_in_turns', process: false}}]
"""


@pytest.mark.slow  # ~65 s on 2 cores: two processes plus the one-process run
def test_two_process_multi_turn_grpo_equals_one_process(task, tmp_path):
    """GRPO with a tool on 2 processes (4 CPU devices each, a global data=2 x fsdp=4 mesh, the real CLI):
    each process steps its own trajectories (its tool calls parsed and run on that process) while both join
    every turn of the global KV session, and the run gives the one-process curves on the same 8-device mesh
    (to 1e-5) with the same trajectories."""
    import sys

    from conftest import FAST_COMPILE
    from test_distributed_grpo import _rows, _run_two_processes

    from jrft.config import load_config
    from jrft.train.runs import run_config

    config_path = tmp_path / "grpo.yaml"
    config_path.write_text(
        MULTIHOST_CONFIG.format(model=task["model_dir"], prompts=task["prompts"], code=task["code"])
    )
    parsed = [task["root"] / f"parsed{pid}.jsonl" for pid in range(2)]

    def texts(path):  # the turns one process parsed (and answered with its own tool workers)
        lines = [json.loads(x) for x in open(path)] if path.exists() else []
        path.unlink(missing_ok=True)
        return lines

    one_out, two_out = tmp_path / "one_process", tmp_path / "two_processes"
    run_config(load_config(config_path, [f"output_dir={one_out}"]), progress=False)
    one_parsed = texts(parsed[0])
    cli = [
        sys.executable,
        "-m",
        "jrft.cli",
        "grpo",
        str(config_path),
        f"output_dir={two_out}",
        "--no-progress",
    ]
    flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4 " + FAST_COMPILE}  # as this process's
    _run_two_processes(tmp_path, lambda pid: cli, extra_env=flags)
    two_parsed = [texts(p) for p in parsed]

    one, two = _rows(one_out), _rows(two_out)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    keys = ["loss", "rewards/mean", "rewards/std", "kl_mean", "grad_norm", "completion_length"]
    keys += ["agent/turns_mean", "agent/tool_call_rate", "agent/tool_calls_per_turn", "agent/tool_failures"]
    for key in keys:
        a, b = [r[key] for r in one], [r[key] for r in two]
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=key)
    assert len({r["rewards/mean"] for r in one}) > 1  # the run moved
    assert any(r["agent/tool_call_rate"] > 0 for r in one)  # the tool ran
    # each process parsed (and ran the tools of) only its own rows' turns: together, the one-process run's
    assert all(two_parsed) and sorted(two_parsed[0] + two_parsed[1]) == sorted(one_parsed)
    # process 0's trajectories (the table's rows: its first 2 x G) are the one-process run's same rows
    tables = [[json.loads(x) for x in open(out / "completions.jsonl")] for out in (one_out, two_out)]
    assert len(tables[0]) == len(tables[1]) == 2 * 2 * 2
    for a, b in zip(*tables, strict=True):
        for key in ("round", "prompt", "completion", "turns"):
            assert b[key] == a[key], key
        np.testing.assert_allclose(b["reward"], a["reward"], rtol=1e-6)
    # and process 0 parsed turns of those rows only
    assert set(two_parsed[0]) <= {t["model"] for row in tables[1] for t in row["turns"]}


ROLLOUT_WORKER = """
import json, sys
import jax
import numpy as np
from jrft.parallel import initialize_distributed, make_mesh

initialize_distributed()  # from the JRFT_* variables
from transformers import AutoTokenizer

from jrft.agentic import load_environment
from jrft.agentic.rollout import AgentSettings, sample_multiturn
from jrft.models import from_pretrained
from jrft.train.rollout import SamplingSettings

model_dir, code, out = sys.argv[1:4]
mesh = make_mesh(data=2, fsdp=4)
tok = AutoTokenizer.from_pretrained(model_dir)
prompt = ["6*7=", "12*3="][jax.process_index()]  # this process's rows of the global batch
batch = {"prompts": [prompt], "columns": {"answer": ["?"]}}
agent = AgentSettings(load_environment(code + ":EndsOn12"), max_turns=3)
settings = SamplingSettings(4, 96, 1.0, None, None, tok.pad_token_id)
model = from_pretrained(model_dir, mesh=mesh)
r = sample_multiturn(model, batch, tok, settings, agent, rng=jax.random.key(7), mesh=mesh)
np.savez(out + ".npz", tokens=r.tokens, completion_mask=r.completion_mask, sampler_logps=r.sampler_logps,
         env_rewards=r.env_rewards)
with open(out + ".json", "w") as f:
    json.dump({"turns": r.turns, "agent_metrics": r.agent_metrics}, f)
"""


@pytest.mark.slow  # ~55 s on 2 cores: two processes starting and compiling the session's turns
def test_two_process_rollout_rows_equal_one_process_rows_while_a_process_idles(task, tmp_path):
    """``sample_multiturn`` on 2 processes (a global 2 x 4 mesh): process 1's episodes all end after one turn
    while process 0's go on, so process 1 joins the later turns of the global session with no live row; each
    process's trajectories equal the one-process rollout's same rows (tokens, masks, sampler log-probs,
    turns) and both report the one-process agent metrics."""
    import sys

    from conftest import FAST_COMPILE
    from test_distributed_grpo import _run_two_processes
    from transformers import AutoTokenizer

    from jrft.models import from_pretrained
    from jrft.parallel import make_mesh

    script = tmp_path / "worker.py"
    script.write_text(ROLLOUT_WORKER)
    outs = [str(tmp_path / f"rollout{pid}") for pid in range(2)]
    flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4 " + FAST_COMPILE}
    cmd = [sys.executable, str(script), str(task["model_dir"]), task["code"]]
    _run_two_processes(tmp_path, lambda pid: [*cmd, outs[pid]], extra_env=flags)

    mesh = make_mesh(data=2, fsdp=4)
    batch = {"prompts": ["6*7=", "12*3="], "columns": {"answer": ["?", "?"]}}
    agent = AgentSettings(load_environment(f"{task['code']}:EndsOn12"), max_turns=3)
    tok = AutoTokenizer.from_pretrained(task["model_dir"])  # as the workers load it
    settings = SamplingSettings(4, 96, 1.0, None, None, tok.pad_token_id)
    model = from_pretrained(task["model_dir"], mesh=mesh)
    one = sample_multiturn(model, batch, tok, settings, agent, rng=jax.random.key(7), mesh=mesh)
    assert [len(t) for t in one.turns[4:]] == [1] * 4  # process 1's episodes: one turn each
    assert max(len(t) for t in one.turns[:4]) > 1  # process 0's went on: process 1 idled
    for pid in range(2):
        arrays = np.load(outs[pid] + ".npz")
        logs = json.loads(open(outs[pid] + ".json").read())
        rows = slice(4 * pid, 4 * pid + 4)
        np.testing.assert_array_equal(arrays["tokens"], one.tokens[rows])
        np.testing.assert_array_equal(arrays["completion_mask"], one.completion_mask[rows])
        np.testing.assert_allclose(arrays["sampler_logps"], one.sampler_logps[rows], atol=1e-6)
        np.testing.assert_allclose(arrays["env_rewards"], one.env_rewards[rows])
        assert logs["turns"] == one.turns[rows]
        assert logs["agent_metrics"] == pytest.approx(one.agent_metrics)
