"""Optimizers and learning-rate schedules (optax), built from explicit keyword hyperparameters.

The trainers call :func:`make_optimizer` with the values of the config's ``optim`` section; nothing here
reads a config object, so the same function serves users who bring their own loop.
"""

from __future__ import annotations

from collections.abc import Callable

import optax


def _warmup(peak: float, warmup: int) -> optax.Schedule:
    """Update ``count`` (0 = the first) of a linear warm-up: ``peak * (count + 1) / warmup``, so step 1 trains
    at ``peak / warmup`` (not 0: a zero first step wastes a batch) and step ``warmup`` at ``peak``."""
    return lambda count: peak * (count + 1) / warmup


def _after_warmup(warm: optax.Schedule | None, rest: optax.Schedule, warmup: int) -> optax.Schedule:
    if warmup <= 0:
        return rest
    return optax.join_schedules([warm, rest], [warmup])


def _cosine(peak: float, warmup: int, total: int, min_ratio: float) -> optax.Schedule:
    decay = optax.cosine_decay_schedule(peak, max(total - warmup, 1), alpha=min_ratio)
    return _after_warmup(_warmup(peak, warmup), decay, warmup)


def _linear(peak: float, warmup: int, total: int, min_ratio: float) -> optax.Schedule:
    decay = optax.linear_schedule(peak, peak * min_ratio, max(total - warmup, 1))
    return _after_warmup(_warmup(peak, warmup), decay, warmup)


def _constant(peak: float, warmup: int, total: int, min_ratio: float) -> optax.Schedule:
    del total, min_ratio
    return _after_warmup(_warmup(peak, warmup), optax.constant_schedule(peak), warmup)


SCHEDULES: dict[str, Callable[..., optax.Schedule]] = {
    "cosine": _cosine,
    "linear": _linear,
    "constant": _constant,
}


def make_schedule(
    name: str, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> optax.Schedule:
    """Learning-rate schedule of update ``count`` (0-based): linear warm-up
    ``lr * (count + 1) / warmup_steps`` (above zero at the first step, ``lr`` at step ``warmup_steps``),
    then ``name``.

    ``cosine`` and ``linear`` decay to ``lr * min_lr_ratio`` at ``total_steps``; ``constant`` stays at ``lr``.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](lr, warmup_steps, total_steps, min_lr_ratio)


def make_optimizer(
    *,
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    max_grad_norm: float | None = 1.0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm gradient clipping and a warm-up schedule.

    Returns ``(optimizer, schedule)``; the schedule is returned so the loop can log the learning rate.
    Weight decay is applied only to parameters with two or more dimensions (not to norms and biases),
    as is usual for transformers.
    """
    sched = make_schedule(
        schedule, lr=lr, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio
    )

    def decay_mask(params):
        import jax

        return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)

    parts = []
    if max_grad_norm is not None and max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts), sched
