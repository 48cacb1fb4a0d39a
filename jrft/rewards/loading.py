"""Load a user's reward function from a config string: ``package.module:function`` or ``file.py:function``.

The loaded function is returned unchanged (so it keeps its ``__name__`` and can be called directly); it is
tagged with the spec it came from (attribute ``__jrft_spec__``) so the process pool can re-load it in a worker
instead of pickling a function whose module exists only in this process.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

from jrft.rewards.protocol import check_signature

SPEC_ATTRIBUTE = "__jrft_spec__"


class RewardLoadError(ImportError):
    """A reward function spec names a file, module or attribute that cannot be loaded."""


def _split_spec(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str) or ":" not in spec:
        raise RewardLoadError(
            f"reward function spec {spec!r} must look like 'package.module:function' or "
            "'path/to/file.py:function'"
        )
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise RewardLoadError(f"reward function spec {spec!r} has an empty module/file or function name")
    return target, attr


def _load_file_module(path: str, spec: str) -> Any:
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise RewardLoadError(f"reward function spec {spec!r}: file {full} does not exist")
    # A stable, unique module name per file so two files called rewards.py do not collide.
    digest = hashlib.sha1(full.encode()).hexdigest()[:12]
    module_name = f"jrft_user_rewards_{digest}"
    import_spec = importlib.util.spec_from_file_location(module_name, full)
    if import_spec is None or import_spec.loader is None:
        raise RewardLoadError(f"reward function spec {spec!r}: cannot import {full} as a Python module")
    module = importlib.util.module_from_spec(import_spec)
    sys.modules[module_name] = module  # dataclasses and pickling by reference look the module up here
    try:
        import_spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(module_name, None)
        raise RewardLoadError(f"reward function spec {spec!r}: importing {full} failed: {err!r}") from err
    return module


def load_object(spec: str) -> tuple[Any, str]:
    """The object named by ``"package.module:attr"`` or ``"path/file.py:attr"``, and the spec made absolute.

    Raises:
      RewardLoadError: the file/module/attribute does not exist or fails to import.
    """
    target, attr = _split_spec(spec)
    canonical = spec
    if target.endswith(".py") or os.sep in target or "/" in target:
        module = _load_file_module(target, spec)
        canonical = f"{os.path.abspath(os.path.expanduser(target))}:{attr}"  # workers may run elsewhere
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise RewardLoadError(
                f"reward function spec {spec!r}: cannot import module {target!r}: {err}"
            ) from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            available = sorted(
                n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))
            )
            raise RewardLoadError(
                f"reward function spec {spec!r}: {target!r} has no attribute {attr!r} "
                f"(callables there: {available})"
            )
        obj = getattr(obj, part)
    return obj, canonical


def load_reward_function(spec: str) -> Callable[..., Any]:
    """Load the reward function named by ``spec`` and check its signature.

    Args:
      spec: ``"package.module:function"`` (imported with :func:`importlib.import_module`) or
        ``"path/to/file.py:function"`` (a path ending in ``.py``, relative to the working directory).
        The attribute may be dotted (``module:Class.method``).

    Returns:
      The callable itself.

    Raises:
      RewardLoadError: the file/module/attribute does not exist or fails to import.
      RewardSignatureError: the callable cannot be called as ``f(prompts=..., completions=..., **columns)``.
    """
    obj, canonical = load_object(spec)
    check_signature(obj, where=f"reward function {spec!r}")
    try:
        setattr(obj, SPEC_ATTRIBUTE, canonical)
    except (AttributeError, TypeError):
        pass  # builtins and slotted objects: they pickle by reference anyway
    return obj
