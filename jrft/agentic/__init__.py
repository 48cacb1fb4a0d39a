"""Multi-turn rollouts for GRPO: tools the model calls mid-completion, environments, trajectories whose loss
covers the model's own tokens only.

Light on purpose (no JAX): tool worker processes import :mod:`jrft.agentic.tools` to run calls. The rollout
lives in :mod:`jrft.agentic.rollout`, the GRPO wiring in :mod:`jrft.agentic.agent`.
"""

from jrft.agentic.environment import Environment, ToolEnvironment, load_environment, prompt_messages
from jrft.agentic.parsing import PARSERS, ToolCall, get_parser, parse_hermes
from jrft.agentic.tools import BUILTIN_TOOLS, ToolBox, load_tool, python, tool_schema

__all__ = [
    "BUILTIN_TOOLS",
    "Environment",
    "PARSERS",
    "ToolBox",
    "ToolCall",
    "ToolEnvironment",
    "get_parser",
    "load_environment",
    "load_tool",
    "parse_hermes",
    "prompt_messages",
    "python",
    "tool_schema",
]
