"""From settings to what a GRPO round needs: the agent (environment factory, turn limit, tool schemas) and
its ``sample_fn`` / ``score_fn`` (``jrft.train.grpo_round.GRPORound``)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from jrft.agentic.environment import ToolEnvironment, load_environment
from jrft.agentic.parsing import get_parser
from jrft.agentic.rollout import AgentSettings, sample_multiturn, score_multiturn
from jrft.agentic.tools import ToolBox


def make_agent(
    *,
    tools: Sequence[Any] = (),
    environment: str | Callable[[], Any] | None = None,
    parser: str | Callable = "hermes",
    tool_timeout: float = 10.0,
    tool_workers: int = 2,
    max_turns: int = 4,
) -> tuple[AgentSettings, ToolBox | None]:
    """The agent of ``tools`` (config entries, see ``jrft.agentic.tools.load_tool``) or of a user
    ``environment`` (``file.py:Class``), and the toolbox to close at the end (None without tools)."""
    if bool(tools) == (environment is not None):
        raise ValueError("an agent needs tools or an environment (exactly one)")
    if environment is not None:
        return AgentSettings(load_environment(environment), max_turns=max_turns), None
    toolbox = ToolBox(tools, timeout=tool_timeout, workers=tool_workers)
    parse = get_parser(parser)
    agent = AgentSettings(lambda: ToolEnvironment(toolbox, parse), max_turns, toolbox.schemas)
    return agent, toolbox


def round_functions(agent: AgentSettings) -> dict[str, Callable]:
    """``{"sample_fn", "score_fn"}`` for :class:`jrft.train.grpo_round.GRPORound`."""
    return {"sample_fn": functools.partial(sample_multiturn, agent=agent), "score_fn": score_multiturn}
