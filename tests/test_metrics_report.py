"""``report_to`` sinks (jsonl, tensorboard, W&B offline) and the console line per logged step."""

import glob
import os
import re

import pytest

from jrft.config import ConfigError, load_config
from jrft.train.metrics import REPORT_TO, MetricsLogger, console_line


def wandb_history(run_file: str, key: str) -> list[str]:
    """The distinct JSON values logged under ``key`` in an offline W&B run file, in order (history items are
    protobuf fields ``key`` (tag 2) and ``value_json`` (tag 16): the bytes hold them as written; each value
    appears in more than one record)."""
    data = open(run_file, "rb").read()
    pattern = re.escape(b"\x12" + bytes([len(key)]) + key.encode() + b"\x82\x01")
    values = []
    for match in re.finditer(pattern, data):
        n = data[match.end()]
        values.append(data[match.end() + 1 : match.end() + 1 + n].decode())
    return list(dict.fromkeys(values))


def test_wandb_offline_run_gets_the_metrics_and_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, total_steps=3, progress=False, report_to=("wandb",), config={"seed": 1})
    logger.log(1, {"loss": 0.5})
    logger.log(2, {"loss": 0.25, "lr": 1e-3})
    logger.log(2, {"acc": 0.75}, prefix="eval/")
    logger.close()
    assert not os.path.exists(tmp_path / "metrics.jsonl") and not os.path.exists(tmp_path / "tensorboard")
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert wandb_history(run_file, "loss") == ["0.5", "0.25"]
    assert wandb_history(run_file, "eval/acc") == ["0.75"]
    run_id = (tmp_path / "wandb_run_id").read_text()
    assert run_id in run_file
    again = MetricsLogger(tmp_path, total_steps=3, progress=False, report_to=("wandb",))
    again.close()
    assert (tmp_path / "wandb_run_id").read_text() == run_id  # a resumed run continues the same W&B run


def test_console_line_per_logged_step_without_a_progress_bar(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, total_steps=10, progress=False, bar_keys=("loss", "accuracy"))
    logger.log(3, {"loss": 0.51234, "grad_norm": 2.0})
    logger.log(3, {"loss": 0.4}, prefix="eval/")
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("step 3/10 | loss 0.5123 | ") and lines[0].endswith(" s")
    assert lines[1].startswith("step 3/10 | eval/loss 0.4 | ")
    assert os.path.exists(tmp_path / "metrics.jsonl") and os.path.exists(tmp_path / "tensorboard")
    assert console_line(1, 2, {}, 0.04) == "step 1/2 | 0.0 s"


def test_report_to_in_the_config():
    assert load_config(None).report_sinks == ("jsonl", "tensorboard")
    assert load_config(None, ["report_to=all"]).report_sinks == REPORT_TO
    assert load_config(None, ["report_to=none"]).report_sinks == ()
    assert load_config(None, ["report_to=[wandb, jsonl]"]).report_sinks == ("jsonl", "wandb")
    with pytest.raises(ConfigError, match=r"report_to: unknown \['mlflow'\]"):
        load_config(None, ["report_to=[mlflow]"])
    from jrft import config

    assert config.REPORT_TO == REPORT_TO
