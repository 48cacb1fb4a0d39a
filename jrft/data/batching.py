"""Padding to length buckets, SFT packing, and collating examples into batches of numpy arrays.

Batch layouts (``B`` rows, ``T`` = the bucketed length of the longest row in the *global* batch, so every
process builds the same shapes):

* ``sft`` (right-padded, or packed):
  ``tokens [B, T] int32``, ``attention_mask [B, T] int32`` (1 = real token), ``loss_mask [B, T] int32``
  (1 = token is a target, aligned with ``tokens``), ``positions [B, T] int32`` (restart at 0 in every
  packed segment; 0 on padding), ``segment_ids [B, T] int32`` (1, 2, ... per packed example, 0 = padding;
  unpacked rows have a single segment 1).
* ``preference``: ``chosen_tokens``, ``chosen_attention_mask``, ``chosen_loss_mask``, ``chosen_positions``
  and the ``rejected_*`` twins, all ``[B, T]`` with one shared T (so a trainer can concatenate them into one
  ``[2B, T]`` forward); ``group [B] int32`` (source row; pairs of one ranked row share it); ``margin [B]
  float32`` when the data has a margin column; ``ref_chosen_logps`` / ``ref_rejected_logps [B] float32`` when
  a trainer attached them to every example (DPO's precomputed reference log-probs).
* ``ranking`` (whole rankings, for listwise reward losses; ``K`` = most items of any row in the dataset):
  ``tokens``, ``attention_mask``, ``loss_mask``, ``positions``: ``[B, K, T]``; ``item_mask [B, K]``
  (1 = a real item; items fill the first slots); ``ranking [B, K] int32`` (item indices best first, 0 where
  masked: ``item_mask`` doubles as the mask over ranking positions); ``group [B]``.
* ``prompt`` (left-padded, for sampling): ``prompt_tokens [B, T] int32``, ``prompt_attention_mask``,
  ``prompt_positions`` (``cumsum(mask) - 1``, 0 on padding), plus host-side lists ``prompts`` (the original
  prompt strings / message lists) and ``columns`` (``{name: [B values]}``: the extra columns, for reward
  functions).

Evaluation batches (a single ordered pass) are filled up to ``B`` with empty rows (all masks 0) and carry
``valid [B] int32`` (1 = a real example), so the last batch has the same shape as the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def bucket_length(n: int, buckets: int | Sequence[int], max_length: int | None = None) -> int:
    """The padded length for a row of ``n`` tokens.

    Args:
      n: the longest row in the batch.
      buckets: an int ``m`` pads to the next multiple of ``m`` (capped at ``max_length`` when ``n``
        fits in it); a sorted list pads to its smallest entry ``>= n``.
      max_length: the configured maximum length.

    Raises:
      ValueError: ``n`` is longer than the largest bucket of a list.
    """
    n = max(int(n), 1)
    if isinstance(buckets, int):
        padded = math.ceil(n / buckets) * buckets
        if max_length is not None and n <= max_length < padded:
            padded = max_length  # the last bucket is max_length itself when it is not a multiple
        return padded
    for b in buckets:
        if b >= n:
            return int(b)
    raise ValueError(f"a batch row of {n} tokens is longer than the largest bucket {max(buckets)}")


def pack_first_fit(
    order: Sequence[int], lengths: Sequence[int], capacity: int, window: int = 32
) -> list[list[int]]:
    """Packs examples (in the given order) into rows of at most ``capacity`` tokens.

    First fit over the last ``window`` open rows: close to first-fit's density, linear time, and the
    shuffled order is mostly kept. Returns lists of example indices, one per packed row.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the packing capacity {capacity}")
        start = max(0, len(rows) - window)
        for r in range(start, len(rows)):
            if room[r] >= n:
                rows[r].append(int(i))
                room[r] -= n
                break
        else:
            rows.append([int(i)])
            room.append(capacity - n)
    return rows


# --- length of a unit (a list of example indices forming one batch row) ----------------------------------


def sft_unit_length(examples: Sequence[dict], unit: Sequence[int]) -> int:
    return sum(len(examples[i]["tokens"]) for i in unit)


def preference_unit_length(examples: Sequence[dict], unit: Sequence[int]) -> int:
    (i,) = unit
    return max(len(examples[i]["chosen_tokens"]), len(examples[i]["rejected_tokens"]))


def ranking_unit_length(examples: Sequence[dict], unit: Sequence[int]) -> int:
    (i,) = unit
    return max(len(t) for t in examples[i]["items_tokens"])


def prompt_unit_length(examples: Sequence[dict], unit: Sequence[int]) -> int:
    (i,) = unit
    return len(examples[i]["prompt_tokens"])


# --- collators: (examples, units, T, pad_id) -> batch -------------------------------------------------------


def collate_sft(examples: Sequence[dict], units: Sequence[Sequence[int]], length: int, pad_id: int) -> dict:
    b = len(units)
    out = {
        "tokens": np.full((b, length), pad_id, np.int32),
        "attention_mask": np.zeros((b, length), np.int32),
        "loss_mask": np.zeros((b, length), np.int32),
        "positions": np.zeros((b, length), np.int32),
        "segment_ids": np.zeros((b, length), np.int32),
    }
    for r, unit in enumerate(units):
        t = 0
        for seg, i in enumerate(unit, start=1):
            ex = examples[i]
            n = len(ex["tokens"])
            out["tokens"][r, t : t + n] = ex["tokens"]
            out["loss_mask"][r, t : t + n] = ex["loss_mask"]
            out["attention_mask"][r, t : t + n] = 1
            out["positions"][r, t : t + n] = np.arange(n)
            out["segment_ids"][r, t : t + n] = seg
            t += n
    return out


# Per-example float32 values a trainer may attach to preference examples before batching; they become
# ``[B]`` batch entries (0 on filler rows).
PRECOMPUTED_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def collate_preference(
    examples: Sequence[dict], units: Sequence[Sequence[int]], length: int, pad_id: int
) -> dict:
    b = len(units)
    out: dict = {}
    for side in ("chosen", "rejected"):
        out[f"{side}_tokens"] = np.full((b, length), pad_id, np.int32)
        for key in ("attention_mask", "loss_mask", "positions"):
            out[f"{side}_{key}"] = np.zeros((b, length), np.int32)
    out["group"] = np.full((b,), -1, np.int32)
    has_margin = any("margin" in examples[u[0]] for u in units if u)
    if has_margin:
        out["margin"] = np.zeros((b,), np.float32)
    for r, unit in enumerate(units):
        if not unit:  # an empty filler row (evaluation)
            continue
        ex = examples[unit[0]]
        for side in ("chosen", "rejected"):
            n = len(ex[f"{side}_tokens"])
            out[f"{side}_tokens"][r, :n] = ex[f"{side}_tokens"]
            out[f"{side}_loss_mask"][r, :n] = ex[f"{side}_loss_mask"]
            out[f"{side}_attention_mask"][r, :n] = 1
            out[f"{side}_positions"][r, :n] = np.arange(n)
        out["group"][r] = ex["group"]
        if has_margin:
            out["margin"][r] = ex.get("margin", 0.0)
    for key in PRECOMPUTED_KEYS:  # attached to the examples before batching (DPO's precomputed reference)
        if all(key in examples[u[0]] for u in units if u):
            out[key] = np.asarray([examples[u[0]][key] if u else 0.0 for u in units], np.float32)
    return out


def collate_ranking(
    examples: Sequence[dict], units: Sequence[Sequence[int]], length: int, pad_id: int
) -> dict:
    b = len(units)
    k = max(examples[u[0]]["max_items"] for u in units if u)
    out = {
        "tokens": np.full((b, k, length), pad_id, np.int32),
        "attention_mask": np.zeros((b, k, length), np.int32),
        "loss_mask": np.zeros((b, k, length), np.int32),
        "positions": np.zeros((b, k, length), np.int32),
        "item_mask": np.zeros((b, k), np.int32),
        "ranking": np.zeros((b, k), np.int32),
        "group": np.full((b,), -1, np.int32),
    }
    for r, unit in enumerate(units):
        if not unit:
            continue
        ex = examples[unit[0]]
        for j, (tokens, mask) in enumerate(zip(ex["items_tokens"], ex["items_loss_mask"], strict=True)):
            n = len(tokens)
            out["tokens"][r, j, :n] = tokens
            out["loss_mask"][r, j, :n] = mask
            out["attention_mask"][r, j, :n] = 1
            out["positions"][r, j, :n] = np.arange(n)
        n_items = len(ex["ranking"])
        out["item_mask"][r, :n_items] = 1
        out["ranking"][r, :n_items] = ex["ranking"]
        out["group"][r] = ex["group"]
    return out


def collate_prompt(
    examples: Sequence[dict], units: Sequence[Sequence[int]], length: int, pad_id: int
) -> dict:
    b = len(units)
    tokens = np.full((b, length), pad_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    prompts: list = []
    names: list[str] = []
    for unit in units:
        for name in examples[unit[0]]["columns"] if unit else ():
            if name not in names:
                names.append(name)
    columns: dict[str, list] = {name: [] for name in names}
    for r, unit in enumerate(units):
        ex = examples[unit[0]] if unit else None
        if ex is not None:
            n = len(ex["prompt_tokens"])
            tokens[r, length - n :] = ex["prompt_tokens"]  # left padding: generation continues at the right
            mask[r, length - n :] = 1
        prompts.append(ex["prompt"] if ex is not None else None)
        for name in names:
            columns[name].append(ex["columns"].get(name) if ex is not None else None)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return {
        "prompt_tokens": tokens,
        "prompt_attention_mask": mask,
        "prompt_positions": positions,
        "prompts": prompts,
        "columns": columns,
    }


def collate_unpaired(
    examples: Sequence[dict], units: Sequence[Sequence[int]], length: int, pad_id: int
) -> dict:
    """KTO batches: the preference layout (``chosen_*`` = completion, ``rejected_*`` = its KL pair) plus
    ``label`` ``[B]`` float32 (1 desirable, 0 undesirable or an evaluation filler row)."""
    out = collate_preference(examples, units, length, pad_id)
    out["label"] = np.asarray([float(examples[u[0]]["label"]) if u else 0.0 for u in units], np.float32)
    return out


# batch kind -> (unit length, collate)
BATCH_KINDS: dict[str, tuple[Callable, Callable]] = {
    "sft": (sft_unit_length, collate_sft),
    "preference": (preference_unit_length, collate_preference),
    "unpaired": (preference_unit_length, collate_unpaired),
    "ranking": (ranking_unit_length, collate_ranking),
    "prompt": (prompt_unit_length, collate_prompt),
}
