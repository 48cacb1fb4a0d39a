"""From a data source to batches in one call: load -> detect format -> validate -> encode -> iterate.

Example::

    train = build_dataset("train.jsonl", tokenizer, objective="sft", options=EncodeOptions(max_length=512))
    print(train.summary())   # rows, examples, truncated / dropped counts
    it = train.iterator(batch_size=16, seed=0, buckets=64, max_length=512)
    batch = next(it)         # dict of numpy arrays, see jrft.data.batching
    ckpt_meta = it.state_dict()

or, from a run config: ``train, eval = datasets_from_config(cfg, tokenizer)`` and
``train_iterator_from_config(cfg, train)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from jrft.data.encode import EncodeOptions, EncodeStats, encode_rows
from jrft.data.errors import DataError
from jrft.data.formats import FORMATS, detect_format, validate_rows
from jrft.data.iterator import BatchIterator, eval_batches
from jrft.data.sources import load_rows

# The batch kind each objective trains on.
OBJECTIVE_KINDS = {
    "sft": "sft",
    "reward": "preference",
    "dpo": "preference",
    "kto": "unpaired",
    "grpo": "prompt",
    "ppo": "prompt",
}


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked out either way), else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


@dataclass
class Dataset:
    """Encoded examples of one source, ready for batching."""

    name: str
    format: str
    kind: str  # "sft" | "preference" | "prompt"
    examples: list[dict]
    stats: EncodeStats
    pad_id: int
    overlong: str = "truncate"

    def __len__(self) -> int:
        return len(self.examples)

    def summary(self) -> str:
        s = self.stats
        text = f"{self.name}: {s.rows} rows ({self.format}) -> {s.examples} examples"
        if s.truncated:
            text += f"; {s.truncated} truncated"
        if s.dropped_overlong:
            text += f"; {s.dropped_overlong} dropped as over-long (data.overlong={self.overlong}), e.g. rows "
            text += ", ".join(map(str, s.dropped_rows))
        if s.identical_pairs:
            text += f"; WARNING: {s.identical_pairs} pairs with chosen == rejected (no gradient), e.g. rows "
            text += ", ".join(map(str, s.identical_rows))
        return text

    def iterator(self, *, batch_size: int, **kwargs: Any) -> BatchIterator:
        """A resumable training iterator (keyword arguments of :class:`BatchIterator`)."""
        return BatchIterator(
            self.examples, kind=self.kind, batch_size=batch_size, pad_id=self.pad_id, **kwargs
        )

    def eval_batches(self, *, batch_size: int, **kwargs: Any) -> Iterator[dict]:
        """One ordered pass (keyword arguments of :func:`eval_batches`)."""
        return eval_batches(
            self.examples, kind=self.kind, batch_size=batch_size, pad_id=self.pad_id, **kwargs
        )


def build_dataset(
    source: Any,
    tokenizer,
    *,
    format: str = "auto",
    objective: str | None = None,
    options: EncodeOptions | None = None,
) -> Dataset:
    """Loads, validates and tokenizes ``source`` (see :func:`jrft.data.sources.load_rows`).

    Args:
      source: path, hub name, list of dicts, ``datasets.Dataset`` or :class:`jrft.config.DataSource`.
      tokenizer: a transformers tokenizer (fast, with a chat template for conversational rows).
      format: a name in :data:`jrft.data.formats.FORMATS` or ``"auto"`` (detected from the first row; for
        ``grpo``/``ppo`` any row with a ``prompt`` is used prompt-only, other columns passed through).
      objective: checks that the format suits it (e.g. DPO needs preference rows).
      options: tokenization and over-long settings.

    Raises:
      DataError: naming the source, row and field of the first bad row; or when every row was dropped.
    """
    options = options or EncodeOptions()
    rows = load_rows(source)
    kind = OBJECTIVE_KINDS.get(objective) if objective is not None else None
    if objective is not None and kind is None:
        raise ValueError(f"unknown objective {objective!r}; expected one of {sorted(OBJECTIVE_KINDS)}")
    if format == "auto":
        if kind == "prompt" and "prompt" in rows.rows[0]:
            format = "prompt_only"
        else:
            format = detect_format(rows.name, rows.rows[0])
    if format not in FORMATS:
        raise DataError(rows.name, f"unknown format {format!r}; expected one of {sorted(FORMATS)}")
    format_kind = FORMATS[format].batch_kind
    if format == "ranked" and options.ranked_as == "lists":
        format_kind = "ranking"
        if kind == "preference":  # a reward model trained listwise
            kind = "ranking"
    if kind is not None and format_kind != kind:
        wanted = [f for f, spec in FORMATS.items() if spec.batch_kind == kind]
        raise DataError(rows.name, f"objective {objective!r} needs rows of format {wanted}, got {format!r}")
    validate_rows(rows.name, rows.rows, format)
    examples, stats = encode_rows(tokenizer, rows.rows, format, options, source=rows.name)
    if not examples:
        raise DataError(rows.name, f"no usable rows: all {stats.rows} were dropped as over-long")
    return Dataset(
        name=rows.name,
        format=format,
        kind=format_kind,
        examples=examples,
        stats=stats,
        pad_id=pad_token_id(tokenizer),
        overlong=options.overlong,
    )


def _options(config) -> EncodeOptions:
    reward = config.objective == "reward"
    return EncodeOptions.from_config(
        config.data,
        completion_only_loss=config.sft.completion_only_loss,
        margin_column=config.reward.margin_column if reward else None,
        ranked_as="lists" if reward and config.reward.loss == "listwise" else "pairs",
    )


def datasets_from_config(config, tokenizer) -> tuple[Dataset, Dataset | None]:
    """The train and (optional) eval datasets of a :class:`jrft.config.RunConfig`."""
    if config.data.train is None:
        raise DataError("config", "data.train is not set")
    opts = _options(config)
    kw = {"format": config.data.format, "objective": config.objective, "options": opts}
    train = build_dataset(config.data.train, tokenizer, **kw)
    evals = build_dataset(config.data.eval, tokenizer, **kw) if config.data.eval is not None else None
    return train, evals


def _length_cap(config) -> int:
    d = config.data
    return d.max_prompt_length if OBJECTIVE_KINDS[config.objective] == "prompt" else d.max_length


def train_iterator_from_config(
    config, dataset: Dataset, *, process_index: int | None = None, process_count: int | None = None
) -> BatchIterator:
    """The training iterator a run config describes (seeded by ``config.seed``)."""
    d = config.data
    buckets: int | Sequence[int] = d.buckets
    return dataset.iterator(
        batch_size=config.train.batch_size,
        buckets=buckets,
        max_length=_length_cap(config),
        seed=config.seed,
        shuffle=d.shuffle,
        packing=d.packing and dataset.kind == "sft",
        process_index=process_index,
        process_count=process_count,
    )


def eval_batches_from_config(
    config, dataset: Dataset, *, process_index: int = 0, process_count: int = 1
) -> Iterator[dict]:
    """One evaluation pass as a run config describes it."""
    return dataset.eval_batches(
        batch_size=config.train.batch_size,
        buckets=config.data.buckets,
        max_length=_length_cap(config),
        process_index=process_index,
        process_count=process_count,
        max_batches=config.train.eval_batches,
    )
