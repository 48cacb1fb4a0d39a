"""Environments: what answers the model between its turns.

An environment is an object with

    reset(row) -> messages                      # the conversation the model starts from
    step(assistant_text) -> (messages | None, reward | None, done)

one instance per trajectory (a GRPO rollout of ``N`` rows makes ``N``). ``row`` is the dataset row: its
``prompt`` plus its other columns. ``step`` gets the text of the model's last turn and returns the messages
to append (``role`` ``tool`` or ``user``), a reward for this step (summed over the trajectory; ``None`` for
none) and whether the episode is over. Games and multi-step tasks implement this directly
(``grpo.environment: my_env.py:MyEnv``, a class or factory called with no argument); tools are the special
case :class:`ToolEnvironment`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from jrft.agentic.parsing import ToolCall
from jrft.agentic.tools import ToolBox

Messages = list[dict[str, Any]]


class Environment(Protocol):
    def reset(self, row: Mapping[str, Any]) -> Messages: ...

    def step(self, assistant_text: str) -> tuple[Messages | None, float | None, bool]: ...


def prompt_messages(prompt: Any) -> Messages:
    """A dataset prompt as messages: a conversation as given, a string as one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


class ToolEnvironment:
    """Tools as an environment: each turn's tool calls (read by ``parser``) run in the shared ``toolbox``
    and their results come back as ``tool`` messages; a turn without a call ends the episode. No reward
    (reward functions score the conversation).

    The calls of one turn are run by :meth:`step`; a rollout that has many trajectories batches its calls
    over the toolbox's workers with :func:`run_tool_turns` instead (same result)."""

    def __init__(self, toolbox: ToolBox, parser: Callable[[str], list[ToolCall]]):
        self.toolbox, self.parser = toolbox, parser
        self.last_calls: list[ToolCall] = []
        self.last_failed = 0  # failed calls of the last step

    def reset(self, row: Mapping[str, Any]) -> Messages:
        return prompt_messages(row["prompt"])

    def parse(self, assistant_text: str) -> list[ToolCall]:
        self.last_calls = self.parser(assistant_text)
        return self.last_calls

    def answer(self, results: Sequence[tuple[str, bool]]) -> tuple[Messages | None, float | None, bool]:
        """The step's outcome once the last parsed calls have ``results``."""
        self.last_failed = sum(not ok for _, ok in results)
        if not self.last_calls:
            return None, None, True
        messages = [
            {"role": "tool", "name": call.name, "content": text}
            for call, (text, _) in zip(self.last_calls, results, strict=True)
        ]
        return messages, None, False

    def step(self, assistant_text: str) -> tuple[Messages | None, float | None, bool]:
        return self.answer(self.toolbox.run(self.parse(assistant_text)))


def run_tool_turns(envs: Sequence[ToolEnvironment], texts: Sequence[str]) -> list[tuple[Any, Any, bool]]:
    """``step`` of many tool environments sharing one toolbox, their calls run together over its workers."""
    calls = [env.parse(text) for env, text in zip(envs, texts, strict=True)]
    flat = [c for cs in calls for c in cs]
    results = envs[0].toolbox.run(flat) if envs and flat else []
    out, k = [], 0
    for env, cs in zip(envs, calls, strict=True):
        out.append(env.answer(results[k : k + len(cs)]))
        k += len(cs)
    return out


def load_environment(spec: str | Callable[[], Environment]) -> Callable[[], Environment]:
    """The environment factory named by ``file.py:Class`` / ``module:Class`` (or given), checked to build an
    object with ``reset`` and ``step``."""
    if isinstance(spec, str):
        from jrft.rewards.loading import load_object

        factory, _ = load_object(spec)
    else:
        factory = spec
    if not callable(factory):
        raise ValueError(f"environment {spec!r} is not a class or factory")
    probe = factory()
    missing = [m for m in ("reset", "step") if not callable(getattr(probe, m, None))]
    if missing:
        raise ValueError(f"environment {spec!r} has no {' or '.join(missing)} method")
    return factory
