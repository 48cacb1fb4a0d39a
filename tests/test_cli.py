import subprocess
import sys

from jrft import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


def test_every_command_module_imports():
    import importlib

    for target, _ in cli.COMMANDS.values():
        module_name, func_name = target.split(":")
        assert callable(getattr(importlib.import_module(module_name), func_name))


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "jrft.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip()
