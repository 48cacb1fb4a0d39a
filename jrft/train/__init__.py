"""Training machinery shared by every objective: state, steps, loop, checkpoints, metrics, optimizers."""

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
