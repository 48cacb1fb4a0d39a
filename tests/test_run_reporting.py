"""What a run tells the user besides metrics: the start-of-run estimate says it counts device buffers, the
end of the run prints the measured peak, and the learning rate at step 1 of a warm-up is above zero."""

import json
import os

import pytest

from jrft.config import load_config
from jrft.parallel.memory import describe_measured_peak, measured_peak
from jrft.train.runs.offline import run_offline


def test_measured_peak_is_host_rss_on_cpu():
    kind, value = measured_peak()
    assert kind == "host RSS" and value > 50 * 2**20  # a Python process with JAX: tens of MiB at least
    assert describe_measured_peak().startswith("measured peak memory: ")


@pytest.fixture(scope="module")
def short_sft(tiny_sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("short_sft")
    config = load_config(
        None,
        [
            *tiny_sft,
            f"output_dir={out}",
            "optim.lr=1e-3",
            "optim.warmup_steps=4",
            "train.steps=2",
            "train.batch_size=4",
            "train.log_every=1",
            "train.save_every=0",
        ],
    )
    return out, config


def test_run_prints_estimate_scope_and_measured_peak(short_sft, capsys):
    out, config = short_sft
    run_offline(config, progress=False)
    printed = capsys.readouterr().out
    assert "of device buffers" in printed and "measured peak memory:" in printed
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[:2] == pytest.approx([1e-3 / 4, 2e-3 / 4])  # warm-up: step 1 trains at lr / warmup_steps
