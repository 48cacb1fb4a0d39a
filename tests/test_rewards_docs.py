"""The examples in docs/rewards.md run as written."""

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "rewards.md"


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_doc_has_runnable_examples():
    assert len(python_blocks(DOC.read_text())) >= 2


def test_doc_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the config example writes my_rewards.py in the working directory
    namespace = {"__name__": "doc_example"}
    for i, block in enumerate(python_blocks(DOC.read_text())):
        try:
            exec(compile(block, f"{DOC.name} python block {i}", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message says which block broke
            pytest.fail(f"docs/rewards.md python block {i} failed: {err!r}")
    assert "rewards/accuracy/mean" in capsys.readouterr().out


def test_doc_yaml_blocks_are_valid_run_configs(tmp_path):
    import yaml

    from jrft.config import load_config

    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert blocks
    for i, block in enumerate(blocks):
        path = tmp_path / f"block{i}.yaml"
        path.write_text(block)
        config = load_config(str(path), ["objective=grpo"])
        assert yaml.safe_load(block)["grpo"]["reward_functions"]
        assert config.grpo.reward_functions
