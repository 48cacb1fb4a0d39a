"""Multi-turn rollouts: the model samples, an environment (tools, a game) answers, the model goes on.

A trajectory of row ``i`` is laid out exactly as a single-turn rollout row (``jrft.train.rollout``):
``[prompt (left-padded, Tp) | continuation (right-padded, Tc)]`` where the continuation is every token after
the first generation prompt, model turns and environment turns interleaved:

    <prompt + gen prompt> | model turn 1 (ends with EOS) | tool/env turn + gen prompt | model turn 2 | ...

``completion_mask [N, Tc]`` is 1 on the model's own tokens only, so environment tokens carry no loss, and
``sampler_logps`` hold the sampler's log-prob of each model token (0 elsewhere). A forward over the final
token sequence (teacher forcing) scores every model token in its full left context, which is exactly the
context it was sampled in: old, reference and sampler log-probs agree (tested). Environment tokens are the
chat template's rendering of the environment's messages, taken as the text the template adds after the
model's turn (so the template's own role markers and generation prompt appear where they would in a
rendered conversation).

How sampling continues between turns (``AgentSettings.kv_cache``): by default one KV-cache session
(``jrft.sampling.session``) serves the whole rollout: the first turn prefills the prompts, every later turn
appends each active row's environment tokens as ONE prefill chunk against the cached conversation and
samples on, never re-encoding it (the cache is rebuilt from the sequences only if its slots run out). With
``kv_cache=False`` each turn calls ``generate`` with every active row's whole sequence as the prompt
(re-prefill; the first turn samples G completions per prompt from one prefill, later batches are padded to
a power of two rows). Either way rows finish independently (a row stops at its EOS or budget while the others
go on; its environment answers once the turn's longest row is done) and finished rows sample nothing more.

Limits per trajectory: ``max_turns`` model turns and ``max_new_tokens`` continuation tokens in all (model
and environment tokens); a trajectory cut by the budget is ``truncated``.

Multi-host (``jax.process_count() > 1``): each process holds, steps and returns the trajectories of ITS
prompts (its rows of the global prompt batch, x G: whole groups), so tools and environments run on the host
that owns the row. The KV session is one global program over the rows of all processes (process ``p``'s
rows at ``[p * n, (p + 1) * n)``, as the single-turn sampler's): before each turn the processes gather every
row's environment tokens, activity flags and budgets (``gather_lists``, ``gather_rows``), all call the same
turn, and each keeps its own rows' samples. Every process takes part in every turn while ANY process has a
live row (a process whose rows are all done sends inactive rows, which sample nothing), so all make the same
calls with the same global shapes; widths of the assembled rows and the agent metrics are global too. Each
row then samples exactly what it samples in a one-process run on the same mesh (random draws depend on the
row's global index). The re-prefill mode (``kv_cache=False``) runs on one process only.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jrft.agentic.environment import ToolEnvironment, run_tool_turns
from jrft.parallel.distributed import gather_lists, gather_rows
from jrft.sampling import FINISH_STOP, bucket_length, generate
from jrft.sampling.session import Session
from jrft.train.rollout import Rollout, SamplingSettings


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    """How trajectories unfold.

    Attributes:
      make_env: builds one environment per trajectory (``reset``/``step``, see ``jrft.agentic.environment``).
      max_turns: model turns per trajectory at most.
      tool_schemas: JSON schemas given to the chat template as ``tools=`` (None: no ``tools`` argument).
      kv_cache: continue each turn from the previous turn's KV cache (``jrft.sampling.session``); False
        re-prefills every active row's whole sequence with ``generate`` each turn.
    """

    make_env: Callable[[], Any]
    max_turns: int = 4
    tool_schemas: list[dict] | None = None
    kv_cache: bool = True


def render(tokenizer, messages: Sequence[Mapping], tools, *, add_generation_prompt: bool) -> str:
    """The chat template on ``messages`` (``tool_calls`` fields left out: the model's own text, tags
    included, is what it generated) with ``tools=`` when there are tools."""
    plain = [{k: v for k, v in m.items() if k not in ("tool_calls", "reward")} for m in messages]
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        plain, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def environment_tokens(tokenizer, conversation, new_messages, tools) -> list[int]:
    """Tokens of ``new_messages`` plus the next generation prompt, as the template renders them after
    ``conversation`` (which ends with the model's turn)."""
    before = render(tokenizer, conversation, tools, add_generation_prompt=False)
    after = render(tokenizer, list(conversation) + list(new_messages), tools, add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError(
            "the chat template rewrites earlier turns when environment messages are added (its rendering "
            "of the conversation is not a prefix of the longer one); multi-turn rollouts need a template "
            "that only appends"
        )
    return encode(tokenizer, after[len(before) :])


@dataclasses.dataclass
class _Trajectory:
    prompt_ids: list[int]
    conversation: list[dict]  # the messages after the prompt (TRL's conversational completion)
    prompt_messages: list[dict]
    env: Any
    ids: list[int] = dataclasses.field(default_factory=list)  # the continuation
    model: list[int] = dataclasses.field(default_factory=list)  # 1 on model tokens
    logps: list[float] = dataclasses.field(default_factory=list)
    turns: list[dict] = dataclasses.field(default_factory=list)  # the log, turn by turn
    unsent: list[int] = dataclasses.field(default_factory=list)  # tokens the session's cache lacks
    reward: float = math.nan  # sum of the environment's rewards (NaN: none given)
    done: bool = False
    truncated: bool = False


def _rows(prompt_batch: Mapping[str, Any], g: int) -> list[dict]:
    cols = prompt_batch["columns"]
    return [
        {"prompt": p, **{k: v[i] for k, v in cols.items()}}
        for i, p in enumerate(prompt_batch["prompts"])
        for _ in range(g)
    ]


def _left_pad(seqs: Sequence[Sequence[int]], rows: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``[rows, T]`` tokens and mask, the sequences left-padded; rows past ``len(seqs)`` repeat the first."""
    width = max(len(s) for s in seqs)
    tokens = np.full((rows, width), pad_id, np.int32)
    mask = np.zeros((rows, width), np.int32)
    for r in range(rows):
        s = seqs[r] if r < len(seqs) else seqs[0]
        tokens[r, width - len(s) :], mask[r, width - len(s) :] = s, 1
    return tokens, mask


def _model_turn(model, trajs, active, settings, tokenizer, rng, turn, mesh, g, session) -> None:
    """Samples one turn for the ``active`` trajectories and appends it (each row cut at its own budget)."""
    budget = [settings.max_new_tokens - len(trajs[i].ids) for i in active]
    if session is not None:
        samples = _sample_session(session, trajs, active, budget)
    else:
        samples = _sample_reprefill(model, trajs, active, budget, settings, tokenizer, rng, turn, mesh, g)
    for i, (ids, logps, stopped) in zip(active, samples, strict=True):
        t = trajs[i]
        t.ids += ids
        t.model += [1] * len(ids)
        t.logps += logps
        text = tokenizer.decode(ids, skip_special_tokens=True)
        t.conversation.append({"role": "assistant", "content": text})
        t.turns.append({"turn": turn, "model": text})
        if not stopped:  # the budget ran out mid-turn
            t.done, t.truncated = True, True


def _sample_session(session, trajs, active, budget) -> list[tuple[list[int], list[float], bool]]:
    """The turn from the session's KV cache: each active row's unsent environment tokens are appended as
    one prefill chunk, then it samples (``jrft.sampling.session``). Multi-host: the session's rows are those
    of every process (gathered here; this process's start at ``process_index * n``)."""
    n = len(trajs)
    chunks, flags, budgets = [[] for _ in range(n)], np.zeros(n, bool), np.ones(n, np.int64)
    for i, b in zip(active, budget, strict=True):
        chunks[i], flags[i], budgets[i] = trajs[i].unsent, True, b
        trajs[i].unsent = []
    out = session.turn(gather_lists(chunks), gather_rows(flags), gather_rows(budgets))
    rows = [jax.process_index() * n + i for i in active]
    return [
        (
            out.tokens[r, : out.lengths[r]].tolist(),
            out.logprobs[r, : out.lengths[r]].tolist(),
            bool(out.stopped[r]),
        )
        for r in rows
    ]


def _sample_reprefill(model, trajs, active, budget, settings, tokenizer, rng, turn, mesh, g):
    """The turn from ``generate`` over each active row's whole sequence so far (re-prefilled)."""
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ()
    common = dict(
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        stop_token_ids=stop,
        rng=jax.random.fold_in(rng, turn),
        mesh=mesh,
        pad_token_id=settings.pad_token_id,
    )
    if turn == 0:  # every prompt's G trajectories start alike: one prefill per prompt, G samples
        firsts = [trajs[i].prompt_ids for i in active[::g]]
        tokens, mask = _left_pad(firsts, len(firsts), settings.pad_token_id)
        out = generate(model, tokens, mask, max_new_tokens=max(budget), num_samples=g, **common)
    else:  # re-prefill each active row's whole sequence (batch padded to a power of two)
        seqs = [trajs[i].prompt_ids + trajs[i].ids for i in active]
        tokens, mask = _left_pad(seqs, bucket_length(len(seqs), 1), settings.pad_token_id)
        out = generate(model, tokens, mask, max_new_tokens=max(budget), num_samples=1, **common)
    toks, lps, lengths, reason = (
        np.asarray(jax.device_get(x)) for x in (out.tokens, out.logprobs, out.lengths, out.finish_reason)
    )
    samples = []
    for r, b in enumerate(budget):
        n = min(int(lengths[r]), b)
        stopped = n == int(lengths[r]) and int(reason[r]) == FINISH_STOP
        samples.append((toks[r, :n].tolist(), lps[r, :n].tolist(), stopped))
    return samples


def _environment_turn(trajs, active, tokenizer, tools, last_turn: bool, max_new_tokens: int) -> None:
    """The environments' answers to the turn just sampled, appended as environment tokens."""
    live = [i for i in active if not trajs[i].done]
    envs, texts = [trajs[i].env for i in live], [trajs[i].conversation[-1]["content"] for i in live]
    if envs and all(isinstance(e, ToolEnvironment) for e in envs):
        outcomes = [(*o, None) for o in run_tool_turns(envs, texts)]
    else:
        outcomes = [_safe_step(env, text) for env, text in zip(envs, texts, strict=True)]
    for i, (messages, reward, done, error) in zip(live, outcomes, strict=True):
        t = trajs[i]
        log = t.turns[-1]
        if error is not None:
            log["environment_error"] = error
        if isinstance(t.env, ToolEnvironment) and t.env.last_calls:
            calls = t.env.last_calls
            t.conversation[-1]["tool_calls"] = [c.as_message_call() for c in calls if c.error is None]
            log["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in calls]
            log["failed_calls"] = t.env.last_failed
        if reward is not None:
            t.reward = (0.0 if math.isnan(t.reward) else t.reward) + float(reward)
            log["reward"] = float(reward)
        if done or not messages:
            t.done = True
            continue
        log["environment"] = [dict(m) for m in messages]
        if last_turn:  # no model turn left to read the answer
            t.done = True
            continue
        extra = environment_tokens(tokenizer, t.prompt_messages + t.conversation, messages, tools)
        if len(extra) >= max_new_tokens - len(t.ids):  # no room left for the model to answer: stop here
            t.done, t.truncated = True, True
            continue
        t.conversation += [dict(m) for m in messages]
        t.ids += extra
        t.unsent += extra  # the KV-cache session appends these before the next turn
        t.model += [0] * len(extra)
        t.logps += [0.0] * len(extra)


def _safe_step(env, text: str) -> tuple[Any, Any, bool]:
    """``env.step(text)``; an exception ends the episode with no reward (it is logged in the turn as
    ``environment_error`` and counted in ``agent/environment_errors``)."""
    try:
        messages, reward, done = env.step(text)
    except Exception as err:  # a broken environment must not stop the run
        return None, None, True, f"{type(err).__name__}: {err}"
    return messages, reward, bool(done), None


def sample_multiturn(
    model,
    prompt_batch: Mapping[str, Any],
    tokenizer,
    settings: SamplingSettings,
    agent: AgentSettings,
    *,
    rng,
    mesh=None,
) -> Rollout:
    """G trajectories per prompt as one :class:`~jrft.train.rollout.Rollout` (layout in the module doc).

    ``rollout.completions`` are the conversations after the prompt (lists of messages, TRL's
    conversational ``completions``), ``rollout.prompts`` the starting messages, ``rollout.turns`` the per-turn
    log (model text, tool calls, environment messages, step rewards) and ``rollout.env_rewards [N]`` the
    summed environment rewards (NaN where none was given).
    """
    if jax.process_count() > 1 and not agent.kv_cache:
        raise NotImplementedError(
            "multi-host multi-turn rollouts continue from the KV session (AgentSettings(kv_cache=True)); "
            "the re-prefill mode runs on one process only"
        )
    t0 = time.perf_counter()
    g, tools = settings.num_generations, agent.tool_schemas
    trajs = []
    for row in _rows(prompt_batch, g):
        env = agent.make_env()
        messages = env.reset(row)
        text = render(tokenizer, messages, tools, add_generation_prompt=True)
        ids = encode(tokenizer, text)
        trajs.append(_Trajectory(ids, [], messages, env, unsent=list(ids)))
    # multi-host: the session spans the rows of all processes, which must hold as many rows each
    counts = gather_rows(np.asarray([[len(trajs), max(len(t.prompt_ids) for t in trajs)]]))  # [P, 2]
    if np.any(counts[:, 0] != len(trajs)):
        raise ValueError(f"multi-turn rollouts need as many rows on every process, got {counts[:, 0]}")
    session = None
    if agent.kv_cache:
        longest = int(counts[:, 1].max())
        session = Session(
            model,
            int(counts[:, 0].sum()),
            longest + 2 * settings.max_new_tokens + 64,  # past it, the session rebuilds its cache
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            stop_token_ids=[tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else (),
            pad_token_id=settings.pad_token_id,
            rng=rng,
            mesh=mesh,
        )
    for turn in range(agent.max_turns):
        active = [i for i, t in enumerate(trajs) if not t.done]
        # every process joins the turn while any has a live row: the session is one global program
        if not gather_rows(np.asarray([len(active)])).any():
            break
        _model_turn(model, trajs, active, settings, tokenizer, rng, turn, mesh, g, session)
        last = turn == agent.max_turns - 1
        _environment_turn(trajs, active, tokenizer, tools, last, settings.max_new_tokens)
    rollout = _assemble(trajs, prompt_batch, settings)
    rollout.seconds = {"sample": time.perf_counter() - t0}
    rollout.agent_metrics = _metrics(trajs)
    if session is not None:
        rollout.agent_metrics["agent/kv_cache_rebuilds"] = float(session.rebuilds)
    return rollout


def _assemble(trajs: list[_Trajectory], prompt_batch, settings: SamplingSettings) -> Rollout:
    n, pad = len(trajs), settings.pad_token_id
    # the widths from the rows of all processes: one global batch shape
    local = [max(len(t.prompt_ids) for t in trajs), max(max(len(t.ids) for t in trajs), 1)]
    tp, longest = (int(x) for x in gather_rows(np.asarray([local])).max(axis=0))
    tc = min(bucket_length(longest, 32), settings.max_new_tokens)
    tokens = np.full((n, tp + tc), pad, np.int32)
    attention = np.zeros((n, tp + tc), np.int32)
    completion_mask = np.zeros((n, tc), np.int32)
    logps = np.zeros((n, tc), np.float32)
    for r, t in enumerate(trajs):
        p, c = len(t.prompt_ids), len(t.ids)
        tokens[r, tp - p : tp], attention[r, tp - p : tp] = t.prompt_ids, 1
        tokens[r, tp : tp + c], attention[r, tp : tp + c] = t.ids, 1
        completion_mask[r, :c], logps[r, :c] = t.model, t.logps
    g = settings.num_generations
    cols = prompt_batch["columns"]
    return Rollout(
        tokens=tokens,
        attention_mask=attention,
        completion_mask=completion_mask,
        sampler_logps=logps,
        truncated=np.asarray([t.truncated for t in trajs]),
        prompt_length=tp,
        prompts=[t.prompt_messages for t in trajs],
        columns={k: [v for v in vals for _ in range(g)] for k, vals in cols.items()},
        completions=[t.conversation for t in trajs],
        completion_ids=[t.ids for t in trajs],
        turns=[t.turns for t in trajs],
        env_rewards=np.asarray([t.reward for t in trajs], np.float64),
    )


def _metrics(trajs: list[_Trajectory]) -> dict[str, float]:
    """The agent metrics over the trajectories of all processes (collective)."""
    per = [
        [
            len(t.turns),
            sum(len(log.get("tool_calls", ())) for log in t.turns),
            sum(log.get("failed_calls", 0) for log in t.turns),
            any(log.get("tool_calls") for log in t.turns),
            sum("environment_error" in log for log in t.turns),
        ]
        for t in trajs
    ]
    turns, calls, failed, called, errors = gather_rows(np.asarray(per, np.float64)).T  # [5, P * n]
    return {
        "agent/turns_mean": float(np.mean(turns)),
        "agent/tool_calls_per_turn": float(calls.sum()) / max(float(turns.sum()), 1.0),
        "agent/tool_call_rate": float(np.mean(called)),  # trajectories with at least one call
        "agent/tool_failures": float(failed.sum()),
        "agent/tool_failure_rate": float(failed.sum()) / max(float(calls.sum()), 1.0),
        "agent/environment_errors": float(errors.sum()),
    }


def score_multiturn(rollout: Rollout, runner) -> Rollout:
    """Rewards of the trajectories: the reward functions over the conversations (``runner``, may be None)
    plus the environment's summed rewards; a row with neither is NaN. ``per_function["environment"]`` holds
    the environment's part when it gave any."""
    from jrft.rewards.runner import reward_stats

    t0 = time.perf_counter()
    env = rollout.env_rewards
    metrics: dict[str, float] = {}
    if runner is not None:
        result = runner(
            prompts=rollout.prompts,
            completions=rollout.completions,
            completion_ids=rollout.completion_ids,
            **rollout.columns,
        )
        base = np.asarray(result.rewards, np.float64)
        rollout.per_function = dict(result.per_function)
        rollout.reward_extra = dict(getattr(result, "extra", {}))  # log_extra columns
        metrics.update(result.metrics)
    else:
        base = np.full(rollout.num_rows, np.nan)
    # decided over all processes' rows: every process must report the same functions (their stats are
    # gathered by name afterwards, jrft.train.rollout.global_reward_metrics)
    if env is not None and not np.all(np.isnan(gather_rows(env))):
        both = np.stack([base, env])
        rewards = np.where(np.all(np.isnan(both), axis=0), np.nan, np.nansum(both, axis=0))
        rollout.per_function["environment"] = env
        metrics.update(reward_stats("rewards/environment", env))
    else:
        rewards = base
    metrics.update(reward_stats("rewards", rewards, none_key="frac_nan"))
    metrics.update(rollout.agent_metrics)
    rollout.rewards = rewards
    rollout.reward_metrics = metrics
    rollout.seconds["rewards"] = time.perf_counter() - t0
    return rollout
