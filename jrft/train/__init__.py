"""Training, in two layers.

The engine (every module here except :mod:`jrft.train.runs`) takes explicit values and never reads a
config: the train state (:mod:`~jrft.train.state`), the generic step (:mod:`~jrft.train.step`), placement on
the mesh (:mod:`~jrft.train.placement`), the loop (:mod:`~jrft.train.loop`), orbax checkpoints
(:mod:`~jrft.train.checkpoint`), metrics, optimizers, log-probs, frozen models (:mod:`~jrft.train.reference`),
the objectives' losses (:mod:`~jrft.train.objectives`), offline evaluation (:mod:`~jrft.train.evaluation`),
rollouts (:mod:`~jrft.train.rollout`) and the GRPO / PPO rounds with their shared plumbing
(:mod:`~jrft.train.rounds`).

The run builders (:mod:`jrft.train.runs`) read a :class:`jrft.config.RunConfig`: one ``setup_run`` builds
mesh, tokenizer, data, model, optimizer and placed state for every objective and for export.
"""

from jrft.train.checkpoint import Checkpointer
from jrft.train.loop import LoopOptions, LoopResult, NonFiniteError, train_loop
from jrft.train.metrics import MetricsLogger
from jrft.train.optim import make_optimizer, make_schedule

__all__ = [
    "Checkpointer",
    "LoopOptions",
    "LoopResult",
    "MetricsLogger",
    "NonFiniteError",
    "make_optimizer",
    "make_schedule",
    "train_loop",
]
