"""``jrft demo`` (interim main job): builds, saves, reloads, checks and generates."""

import json

from jrft.commands.demo import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--max-new", "6", "--skip-transformers"]) == 0
    out = capsys.readouterr().out
    assert "logits identical" in out and "[5/5]" in out
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (tmp_path / "model" / "tokenizer.json").is_file()
