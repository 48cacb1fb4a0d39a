"""The ``jrft`` command line: ``jrft <command> [args ...]``.

Each command lives in its own module and is imported only when it runs, so ``jrft --help`` is fast and a
broken optional dependency of one command does not break the others. To add a command, add one line to
``COMMANDS``: name -> ("module:function", one-line help). The function takes the remaining argv list and
returns an exit code.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "sft": ("jrft.commands.train:sft", "supervised fine-tuning on prompt/completion or chat data"),
    "reward": ("jrft.commands.train:reward", "train a reward model (Bradley-Terry) on preference pairs"),
    "dpo": ("jrft.commands.train:dpo", "direct preference optimization against a frozen reference"),
    "kto": ("jrft.commands.train:kto", "KTO: unpaired desirable/undesirable completions against a reference"),
    "export": ("jrft.commands.export:main", "export a run's checkpoint in transformers format"),
    "grpo": ("jrft.commands.train:grpo", "GRPO: sample groups, score with reward functions, update"),
    "ppo": ("jrft.commands.train:ppo", "PPO (RLHF): reward model and/or functions, value model, GAE, update"),
    "compile": ("jrft.commands.compile:main", "compile a run's programs for a TPU topology: fits or not"),
    "demo": ("jrft.commands.demo:main", "a tiny reasoning model from scratch on CPU: SFT -> GRPO, report"),
}


def _usage() -> str:
    lines = ["usage: jrft <command> [args ...]", "", "commands:"]
    width = max((len(name) for name in COMMANDS), default=8)
    for name, (_, help_text) in sorted(COMMANDS.items()):
        lines.append(f"  {name.ljust(width)}  {help_text}")
    lines.append("")
    lines.append("Run 'jrft <command> --help' for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name in ("-V", "--version"):
        from jrft import __version__

        print(__version__)
        return 0
    if name not in COMMANDS:
        print(f"jrft: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
