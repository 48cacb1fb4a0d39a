"""``run_demo``: the whole demo for one objective, from the build to ``result.json``.

Each objective has a builder (tokenizer, model from scratch, task files) and a runner (its stages):
:mod:`jrft.demo.stages` for the addition task (grpo, dpo, rlhf), :mod:`jrft.demo.tools_demo` for the
multiplication-with-a-tool task (tools).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from jrft.demo import stages, tools_demo
from jrft.demo.settings import DemoConfig
from jrft.demo.stages import DemoResult, _Timer, adapter_params, num_params

# objective -> (builder, runner)
OBJECTIVE_STAGES: dict[str, tuple[Callable, Callable]] = {
    "grpo": (stages.build, stages.run_grpo_demo),
    "dpo": (stages.build, stages.run_dpo_demo),
    "rlhf": (stages.build, stages.run_rlhf_demo),
    "tools": (tools_demo.build, tools_demo.run_tools_demo),
}


def run_demo(cfg: DemoConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> DemoResult:
    """Runs the whole demo for ``cfg.objective``; returns what the report needs (also written as
    ``<output_dir>/result.json``)."""
    from transformers import AutoTokenizer

    out = os.path.abspath(cfg.output_dir)
    os.makedirs(out, exist_ok=True)
    result = DemoResult(objective=cfg.objective, output_dir=out)
    t0 = time.perf_counter()
    builder, runner = OBJECTIVE_STAGES[cfg.objective]
    with _Timer(result, "build", log):
        paths = builder(cfg, out)
        tokenizer = AutoTokenizer.from_pretrained(paths["base"])
        result.num_params = num_params(paths["base"])
        if cfg.lora.enabled:
            result.lora_rank, result.adapter_params = cfg.lora.rank, adapter_params(cfg, paths["base"])
        log(
            f"   tokenizer: {len(tokenizer)} tokens; model: llama, {result.num_params / 1e6:.2f}M parameters "
            f"(saved in transformers format: {paths['base']}); task files in {os.path.join(out, 'data')}"
        )
    try:
        runner(cfg, result, paths, tokenizer, log, progress)
    finally:
        result.seconds["total"] = time.perf_counter() - t0
        with open(os.path.join(out, "result.json"), "w", encoding="utf-8") as f:
            json.dump(result.to_json(), f, indent=1)
    return result
