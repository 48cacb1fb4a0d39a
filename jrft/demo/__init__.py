"""``jrft demo``: a tiny reasoning model trained from scratch on CPU, SFT then GRPO (or DPO, or a reward model
then PPO, or multi-turn GRPO with a tool), with a report that shows it learned.

Modules: :mod:`~jrft.demo.settings` (the schema of ``configs/demo.yaml``), :mod:`~jrft.demo.run` (the whole
demo per objective), :mod:`~jrft.demo.stages` (the addition task's stages), :mod:`~jrft.demo.tools_demo` and
:mod:`~jrft.demo.tools_task` (the tool-use task), :mod:`~jrft.demo.evaluate` (held-out exact match, format
rate, preference accuracy, reward scores), :mod:`~jrft.demo.report` (plot, table, samples).
"""

from jrft.demo.run import run_demo as run_demo
from jrft.demo.settings import DemoConfig as DemoConfig
from jrft.demo.settings import load_demo_config as load_demo_config
from jrft.demo.stages import DemoResult as DemoResult
