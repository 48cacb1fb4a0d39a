"""The reward-function contract (TRL's), and the helpers every built-in shares.

A reward function is any callable invoked with keyword arguments only::

    f(prompts=[...], completions=[...], completion_ids=[...], **columns) -> list[float | None]

- ``prompts``, ``completions``: ``[N]`` lists, one entry per completion. Each entry is a string, or, for
  conversational data, a list of chat messages ``{"role": ..., "content": ...}``.
- ``completion_ids``: ``[N]`` lists of token ids (ints), or ``None`` when the caller has none.
- ``**columns``: every extra dataset column, as an ``[N]`` list aligned with the completions (a prompt's
  value repeated for each of its G completions).
- The return value is one ``float | None`` per completion; ``None`` means "not applicable here" (it is
  left out of the weighted sum, not counted as 0).

``async def`` functions are awaited concurrently. A function that does not take ``**kwargs`` is given only
the arguments it names, so ``def f(completions, answer): ...`` works too.

TRL's extra keyword arguments are passed as well (:data:`HOOK_ARGUMENTS`): ``trainer_state``
(:class:`TrainerState`: ``global_step``, ``epoch``, ``max_steps``), ``log_metric(name, value)`` (a scalar for
this batch, averaged over the batch's calls and logged as ``name`` with the step's metrics) and
``log_extra(column, values)`` (one value per completion, a column of the completions table).
"""

from __future__ import annotations

import dataclasses
import inspect
import unicodedata
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

Completion = str | list[dict[str, Any]]

# The arguments the runner always supplies; everything else must come from a dataset column.
HOOK_ARGUMENTS = ("trainer_state", "log_metric", "log_extra")
STANDARD_ARGUMENTS = ("prompts", "completions", "completion_ids", *HOOK_ARGUMENTS)


@dataclasses.dataclass(frozen=True)
class TrainerState:
    """What TRL's reward functions read of ``transformers.TrainerState`` (passed as ``trainer_state``).

    Attributes:
      global_step: optimizer steps completed before this batch (0 during the first).
      epoch: passes over the training prompts so far (a float, as in transformers).
      max_steps: the run's ``train.steps``.
    """

    global_step: int = 0
    epoch: float = 0.0
    max_steps: int = 0

    @property
    def step(self) -> int:
        return self.global_step


class RewardFunction(Protocol):
    """Structural type of a reward function (see the module docstring for the contract)."""

    def __call__(
        self, *, prompts: Sequence[Completion], completions: Sequence[Completion], **kwargs: Any
    ) -> Sequence[float | None]: ...


class RewardSignatureError(TypeError):
    """A reward function cannot be called with the TRL keyword contract."""


def reward_name(fn: Callable[..., Any]) -> str:
    """The name used in metrics and logs: ``fn.name``, else ``fn.__name__``, else the class name."""
    name = getattr(fn, "name", None)
    if isinstance(name, str) and name:
        return name
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and name:
        return name
    return type(fn).__name__


def is_async(fn: Callable[..., Any]) -> bool:
    """True for ``async def`` functions and for objects whose ``__call__`` is ``async def``."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def check_signature(fn: Callable[..., Any], where: str = "") -> inspect.Signature:
    """Raise :class:`RewardSignatureError` unless ``fn`` can be called as ``fn(completions=..., ...)``.

    Accepted: any callable that takes ``completions`` (or ``**kwargs``) by keyword and has no required
    positional-only parameter. Required keyword parameters other than the standard ones are allowed: they
    must then be dataset columns, which is checked when the runner calls the function.
    """
    label = where or reward_name(fn)
    if not callable(fn):
        raise RewardSignatureError(f"{label}: reward function is not callable (got {type(fn).__name__})")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as err:
        raise RewardSignatureError(
            f"{label}: cannot read the signature of the reward function: {err}"
        ) from err
    params = sig.parameters.values()
    positional_only = [p.name for p in params if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if positional_only:
        raise RewardSignatureError(
            f"{label}: reward functions are called with keyword arguments only (TRL contract "
            f"f(prompts=..., completions=..., **columns)), but parameter(s) {positional_only} are "
            "positional-only"
        )
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    if not has_var_kw and "completions" not in sig.parameters:
        raise RewardSignatureError(
            f"{label}: reward function must accept 'completions' (or **kwargs); its signature is {sig}. "
            "Expected f(prompts=..., completions=..., completion_ids=..., **columns)"
        )
    return sig


def select_arguments(sig: inspect.Signature, kwargs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The subset of ``kwargs`` that a function with signature ``sig`` accepts.

    Functions taking ``**kwargs`` get everything; others get only the names they declare. A required
    parameter that is neither a standard argument nor a column raises, naming the missing column.
    """
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    chosen = {}
    for name, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
            continue
        if name in kwargs:
            chosen[name] = kwargs[name]
        elif p.default is p.empty:
            columns = sorted(k for k in kwargs if k not in STANDARD_ARGUMENTS)
            raise RewardSignatureError(
                f"{where}: required argument {name!r} is not a dataset column (columns: {columns})"
            )
    return chosen


def completion_text(completion: Completion) -> str:
    """Text of a completion: the string itself, or the content of the last message of a conversation.

    Message contents given as a list of parts (``[{"type": "text", "text": ...}, ...]``) are joined.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion:
        content = completion[-1].get("content", "") if isinstance(completion[-1], Mapping) else completion[-1]
        if isinstance(content, str):
            return content
        if isinstance(content, Sequence):
            return "".join(
                part.get("text", "") if isinstance(part, Mapping) else str(part) for part in content
            )
    if completion is None or (isinstance(completion, Sequence) and not completion):
        return ""
    raise TypeError(
        f"completion must be a string or a list of chat messages, got {type(completion).__name__}"
    )


def normalize_unicode(text: str) -> str:
    """NFKC-normalise (full-width digits and letters become ASCII) and map the unicode minus sign to '-'."""
    return unicodedata.normalize("NFKC", text).replace("\u2212", "-")


def column(columns: Mapping[str, Any], name: str, reward: str) -> list[Any]:
    """A dataset column by name, or a KeyError that names the reward and the columns present."""
    if name not in columns:
        raise KeyError(f"reward {reward!r} needs dataset column {name!r}; columns given: {sorted(columns)}")
    return list(columns[name])


def freeze_names(
    reward: Any, field: str, known: Collection[str], what: str, *, empty_ok: bool = True
) -> None:
    """Stores the field ``field`` of the frozen dataclass ``reward`` (names given as any sequence, e.g. a
    YAML list) as a tuple, after checking that each is one of ``known`` and, unless ``empty_ok``, that there
    is at least one; the ValueError names the field (``<reward.name>.<field>``), the names and ``what``."""
    names = tuple(getattr(reward, field))
    unknown = [n for n in names if n not in known]
    if unknown or not (names or empty_ok):
        problem = f"unknown {what} {unknown}" if unknown else f"no {what}"
        raise ValueError(f"{reward.name}.{field}: {problem}; known: {sorted(known)}")
    object.__setattr__(reward, field, names)
