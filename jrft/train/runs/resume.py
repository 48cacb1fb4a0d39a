"""Resuming compares the new config with the one stored in the latest checkpoint.

What a run *is* — its objective, model, tokenizer, data and reference/reward/value models — cannot change
under a resume without the result silently mixing two runs (a new ``model.path`` of the same shape would
keep training the old weights), so such changes are refused, listing the keys, unless asked for
(``--allow-config-change``). Everything else (learning rate, steps, intervals, loss coefficients) may change;
the changes are printed and written to ``metrics.jsonl`` as a ``config_changes`` record at the resumed step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax

from jrft.config import RunConfig

# Dotted keys (or section prefixes) whose change makes it another run.
IDENTITY_KEYS = (
    "objective",
    "model.path",
    "model.tokenizer",
    "model.dtype",
    "model.param_dtype",
    "data.train",
    "data.eval",
    "data.format",
    "ppo.reward_model",
    "ppo.value_model",
    "ppo.value_model_path",
)
_IGNORED = ("output_dir", "train.resume")


class ConfigDriftError(RuntimeError):
    """The config of a resumed run changes what the run is (see :data:`IDENTITY_KEYS`)."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``; lists stay whole values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _is_identity(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IDENTITY_KEYS)


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(identity changes, other changes)``, each ``{dotted key: (old, new)}``; a key missing on one side
    has ``None`` there."""
    old, cur = flatten(saved), flatten(new)
    identity, other = {}, {}
    for key in sorted(set(old) | set(cur)):
        if key in _IGNORED or old.get(key) == cur.get(key):
            continue
        (identity if _is_identity(key) else other)[key] = (old.get(key), cur.get(key))
    return identity, other


def _listing(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())


def checkpoint_meta(config: RunConfig) -> dict[str, Any]:
    """The JSON stored beside every checkpoint's arrays: the config and, for LoRA (whose checkpoints leave
    the base weights out), which base they belong to (``lora_base``: path, size and fingerprint)."""
    from jrft.train.runs.setup import lora_base_reference

    base = lora_base_reference(config)
    return {"config": config.to_dict(), **({"lora_base": base} if base else {})}


def check_lora_base(config: RunConfig, meta: Mapping[str, Any], *, where: str) -> None:
    """Raises a :class:`ConfigDriftError` when a LoRA checkpoint's base (``meta["lora_base"]``) is not the
    checkpoint at ``config.model.path`` now: its adapters would be restored onto other weights."""
    saved = meta.get("lora_base")
    if not saved or config.lora.rank == 0:
        return
    from jrft.train.runs.setup import lora_base_reference

    now = lora_base_reference(config)
    if (now["bytes"], now["sha256"]) != (saved.get("bytes"), saved.get("sha256")):
        raise ConfigDriftError(
            f"{where} holds LoRA adapters trained on the base {saved.get('path')!r} ({saved.get('bytes')} "
            f"bytes of weights, fingerprint {str(saved.get('sha256'))[:12]}), but model.path "
            f"{config.model.path!r} now holds other weights ({now['bytes']} bytes, fingerprint "
            f"{now['sha256'][:12]}); the checkpoint leaves the base out, so resume it against the same base"
        )


def check_resume(config: RunConfig, *, allow_changes: bool = False) -> dict[str, tuple[Any, Any]]:
    """Compares ``config`` with the latest checkpoint's (nothing to do without one); returns the changes.

    Raises:
      ConfigDriftError: an identity key changed and ``allow_changes`` is false; the message lists them.
    """
    from jrft.train.checkpoint import Checkpointer

    directory = os.path.join(config.output_dir, "checkpoints")
    if not config.train.resume or ("://" not in directory and not os.path.isdir(directory)):
        return {}
    checkpointer = Checkpointer(directory)
    try:
        step = checkpointer.latest_step()
        if step is None:
            return {}
        meta = checkpointer.read_meta(step)
    finally:
        checkpointer.close()
    check_lora_base(config, meta, where=f"checkpoint step {step} in {directory}")
    saved = meta.get("config")
    if not isinstance(saved, Mapping):
        return {}
    identity, other = config_changes(saved, config.to_dict())
    if identity and not allow_changes:
        raise ConfigDriftError(
            f"resuming {config.output_dir} from step {step} with a config that changes what the run is: "
            f"{_listing(identity)}. Use a new output_dir, or pass --allow-config-change to resume anyway"
        )
    changes = {**identity, **other}
    if changes and jax.process_index() == 0:
        print(f"jrft: resuming from step {step} with changed settings: {_listing(changes)}", flush=True)
        record = {"step": step, "config_changes": {k: {"old": o, "new": n} for k, (o, n) in changes.items()}}
        os.makedirs(config.output_dir, exist_ok=True)
        with open(os.path.join(config.output_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
    return changes
