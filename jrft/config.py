"""Typed run configuration: frozen dataclasses loaded from YAML plus dotted ``key=value`` overrides.

One :class:`RunConfig` describes a whole run; each section is a frozen dataclass whose ``__post_init__``
checks its own fields (comments say why a field exists). Loading is strict:

* an unknown key is an error naming the full dotted key (``optim.lrr``) and the YAML file;
* a value of the wrong type is an error naming the key, the expected type and the value;
* command-line overrides ``section.field=value`` are parsed as YAML scalars/flow values
  (``optim.lr=1e-4``, ``data.train=path.jsonl``, ``mesh.data=-1``,
  ``grpo.reward_functions=[{name: format}]``).

PyYAML follows YAML 1.1, where ``1e-4`` (no dot) is a *string*; float fields therefore also accept strings
that Python's ``float()`` parses, so ``lr: 1e-4`` works as users expect.

Example::

    cfg = load_config("configs/sft.yaml", ["optim.lr=3e-4", "train.steps=100"])
    cfg.optim.lr          # 0.0003
    cfg.to_dict()         # plain dict for logs and checkpoint metadata
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration. ``key`` is the dotted key (e.g. ``optim.lr``) when one is known."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key
        self.message = message


def check_field(cond: bool, key: str, message: str) -> None:
    """Raise a :class:`ConfigError` for field ``key`` of the section being validated.

    Called from a section's ``__post_init__``; the loader prefixes ``key`` with the section's dotted path.
    """
    if not cond:
        raise ConfigError(message, key)


def check_positive(section: Any, *names: str) -> None:
    """``check_field(value > 0, ...)`` for each named field of ``section``."""
    for name in names:
        value = getattr(section, name)
        check_field(value > 0, name, f"must be positive, got {value!r}")


def check_nonnegative(section: Any, *names: str) -> None:
    """``check_field(value >= 0, ...)`` for each named field of ``section``."""
    for name in names:
        value = getattr(section, name)
        check_field(value >= 0, name, f"must be >= 0, got {value!r}")


# ---------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------

DTYPES = ("float32", "bfloat16", "float16")
# Named remat policies of jrft.models.layers.REMAT_POLICIES (applied to the scanned layer body); copied here
# so loading a config does not import JAX, and kept equal by tests/test_config_load.py.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_no_batch", "save_attn_out", "save_qkv_attn_out")


@dataclass(frozen=True)
class ModelSource:
    """Which model to fine-tune and in what precision."""

    # A local directory with config.json + safetensors, or a hub id (downloaded through transformers' cache).
    path: str = ""
    # Compute dtype of activations; log-probs and losses are always float32 (the log-prob contract).
    dtype: str = "float32"
    # Storage dtype of trainable parameters; float32 keeps AdamW updates exact, bfloat16 halves memory.
    param_dtype: str = "float32"
    # Activation rematerialisation policy name (see jrft.models); trades compute for memory on long sequences.
    remat: str = "none"
    # Tokenizer location; None means "the same place as the model", the usual case.
    tokenizer: str | None = None

    def __post_init__(self):
        check_field(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        check_field(
            self.param_dtype in DTYPES, "param_dtype", f"must be one of {DTYPES}, got {self.param_dtype!r}"
        )
        check_field(
            self.remat in REMAT_POLICIES, "remat", f"must be one of {REMAT_POLICIES}, got {self.remat!r}"
        )

    @property
    def tokenizer_path(self) -> str:
        """The tokenizer location, defaulting to the model path."""
        return self.tokenizer if self.tokenizer else self.path


# transformers' / PEFT's names of the decoder's projections, in the order jrft.models.lora applies them.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021, arXiv:2106.09685): ``W x + scale * B A x`` on the targeted
    projections; only A and B are trained, the base weights stay frozen (no gradients, no optimizer state)
    and serve as the reference model with the adapters off."""

    # Adapter rank r; 0 = off (full fine-tuning, every behaviour as without this section).
    rank: int = 0
    # Scale of the adapter path: alpha / r (or alpha / sqrt(r) with use_rslora), PEFT's convention.
    alpha: float = 16.0
    # Dropout on the adapter path's input, PEFT's ``B(A(dropout(x))) * scale``: a regulariser for small data
    # (the QLoRA paper uses 0.1 for 7B-13B models, 0.05 for 33B-65B). Training forwards only (the train step
    # draws its masks from the state's rng, so a resume stays exact); the sampler, the reference and
    # evaluation never drop. In [0, 1).
    dropout: float = 0.0
    # Which projections get adapters: a list of names out of LORA_MODULES, or one regex that must match
    # (re.fullmatch) the PEFT module path ``self_attn.q_proj`` ... ``mlp.down_proj``. Default: all seven
    # (adapting every linear layer matters more than the rank; QLoRA paper, arXiv:2305.14314).
    target_modules: tuple[str, ...] | str = LORA_MODULES
    # Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023, arXiv:2312.03732): keeps updates of high
    # ranks from vanishing.
    use_rslora: bool = False
    # How A starts (B always starts at 0, so the first forward equals the base model): "default" is PEFT's
    # Kaiming-uniform, "gaussian" is normal with std 1 / r.
    init: Literal["default", "gaussian"] = "default"
    # A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors, as ``peft`` saves it
    # and as jrft's export writes under export/adapter/) whose A and B are the run's starting adapters, e.g.
    # a LoRA SFT before DPO. Its r, lora_alpha, use_rslora and adapted modules fill rank, alpha, use_rslora
    # and target_modules where those are left at their defaults; set otherwise, they must agree with it.
    init_from: str | None = None
    # QLoRA storage of the frozen base (Dettmers et al. 2023, arXiv:2305.14314), so that a bigger base fits:
    # "nf4" is QLoRA's 4-bit NormalFloat (blocks of 64 inputs, one float32 absmax each, two codes per
    # byte: ~0.56 byte per weight, ~1/3.5 of bf16; no double quantization); "int8" keeps one float32 scale
    # per output channel (~1/2 of bf16; closer to the float logits); "none" keeps model.param_dtype. The
    # layers' seven projections are dequantized one layer at a time inside the forward; embeddings, LM head
    # and norms are not quantized. Needs rank > 0 (only a frozen base may be quantized); the export is the
    # dequantized base plus the adapters.
    base_quantization: Literal["none", "int8", "nf4"] = "none"

    def __post_init__(self):
        if self.init_from:
            _take_adapter_settings(self)
        check_nonnegative(self, "rank")
        check_positive(self, "alpha")
        check_field(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ConfigError(f"not a valid regex ({e})", "target_modules") from None
        else:
            unknown = [m for m in self.target_modules if m not in LORA_MODULES]
            check_field(not unknown, "target_modules", f"unknown {unknown}; known: {list(LORA_MODULES)}")
        if self.rank > 0:
            check_field(bool(self.modules), "target_modules", "selects no projection")
        check_field(
            self.base_quantization == "none" or self.rank > 0,
            "base_quantization",
            f"{self.base_quantization!r} quantizes the frozen base of a LoRA run: set lora.rank > 0",
        )

    @property
    def modules(self) -> tuple[str, ...]:
        """The targeted names out of ``LORA_MODULES`` (a regex resolved against the PEFT module paths)."""
        if isinstance(self.target_modules, str):
            paths = {
                m: ("mlp." if m.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn.") + m
                for m in LORA_MODULES
            }
            return tuple(m for m in LORA_MODULES if re.fullmatch(self.target_modules, paths[m]))
        return tuple(m for m in LORA_MODULES if m in self.target_modules)

    @property
    def scale(self) -> float:
        """The adapter path's multiplier: ``alpha / r`` or, with ``use_rslora``, ``alpha / sqrt(r)``."""
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)


PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# adapter_config.json keys whose non-default values describe adapters jrft does not build.
_PEFT_UNSUPPORTED = {
    "use_dora": False,
    "bias": "none",
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "fan_in_fan_out": False,
}


def _safetensors_names(path: str) -> list[str]:
    """Tensor names from a safetensors file's header (8-byte little-endian length, then JSON)."""
    import json
    import struct

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(n, 100 * 2**20)))
        return [k for k in header if k != "__metadata__"]
    except (struct.error, ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: not a safetensors file ({e})", "init_from") from None


def peft_adapter_settings(directory: str) -> dict[str, Any]:
    """``{rank, alpha, use_rslora, modules}`` of a PEFT LoRA adapter directory: r / lora_alpha / use_rslora
    from ``adapter_config.json``; the adapted modules from the tensor names of ``adapter_model.safetensors``
    (what was saved, whatever form ``target_modules`` took: names, a regex, ``all-linear``).

    Raises:
      ConfigError: (key ``init_from``) a missing file, another PEFT type, or adapters jrft does not build
        (DoRA, biases, ``modules_to_save``, per-module ranks, a subset of layers, embeddings); the message
        names the file and the field.
    """
    import json

    cfg_path, weights = os.path.join(directory, PEFT_CONFIG), os.path.join(directory, PEFT_WEIGHTS)
    for p in (cfg_path, weights):
        check_field(
            os.path.isfile(p),
            "init_from",
            f"{p} not found (a PEFT adapter directory holds both {PEFT_CONFIG} and {PEFT_WEIGHTS})",
        )
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    check_field(
        cfg.get("peft_type", "LORA") == "LORA",
        "init_from",
        f"{cfg_path}: peft_type {cfg.get('peft_type')!r}, not LORA",
    )
    for key, default in _PEFT_UNSUPPORTED.items():
        value = cfg.get(key, default)
        check_field(
            value == default or (not value and not default),
            "init_from",
            f"{cfg_path}: {key}={value!r} is not supported by jrft's LoRA (only {default!r})",
        )
    modules = set()
    pattern = re.compile(r"(?:^|\.)layers\.\d+\.(?:self_attn|mlp)\.(\w+)\.lora_[AB]\.weight$")
    for name in _safetensors_names(weights):
        match = pattern.search(name)
        check_field(
            bool(match) and match.group(1) in LORA_MODULES,
            "init_from",
            f"{weights}: tensor {name!r} is not a LoRA A/B of a decoder projection {list(LORA_MODULES)}",
        )
        modules.add(match.group(1))
    check_field(bool(modules), "init_from", f"{weights}: holds no LoRA tensors")
    for key in ("r", "lora_alpha"):
        check_field(isinstance(cfg.get(key), (int, float)), "init_from", f"{cfg_path}: no number {key!r}")
    return {
        "rank": int(cfg["r"]),
        "alpha": float(cfg["lora_alpha"]),
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "modules": tuple(m for m in LORA_MODULES if m in modules),
        "file": cfg_path,
    }


def _take_adapter_settings(lora: LoRAConfig) -> None:
    """Fills ``lora``'s rank / alpha / use_rslora / target_modules from its ``init_from`` adapter where they
    are at their defaults; where set, they must agree (the error names the field and the adapter's file)."""
    found = peft_adapter_settings(lora.init_from)
    where = found["file"]
    defaults = LoRAConfig()
    for name, peft_name in (("rank", "r"), ("alpha", "lora_alpha"), ("use_rslora", "use_rslora")):
        value = getattr(lora, name)
        if value == getattr(defaults, name):
            object.__setattr__(lora, name, found[name])
        check_field(
            getattr(lora, name) == found[name],
            name,
            f"{value!r} but lora.init_from's {where} has {peft_name}={found[name]!r} "
            "(leave it unset to take it)",
        )
    if lora.target_modules == defaults.target_modules:
        object.__setattr__(lora, "target_modules", found["modules"])
    check_field(
        set(lora.modules) == set(found["modules"]),
        "target_modules",
        f"selects {list(lora.modules)} but lora.init_from's {where.removesuffix(PEFT_CONFIG) + PEFT_WEIGHTS} "
        f"adapts {list(found['modules'])} (leave it unset to take them)",
    )


@dataclass(frozen=True)
class DataSource:
    """Where rows come from: a local file, a hub dataset, or rows written inline in the config.

    Shorthand in YAML: a string is ``path``; a list of mappings is ``rows``.
    """

    # A .json/.jsonl/.parquet file (relative to the working directory) or, if no such file exists,
    # a hub dataset name (e.g. "openai/gsm8k") loaded with the datasets library.
    path: str | None = None
    # Split of a hub dataset (ignored for local files, which are one split).
    split: str = "train"
    # Hub dataset configuration name (e.g. "main" for gsm8k).
    subset: str | None = None
    # Inline rows, for tiny experiments and tests.
    rows: tuple[dict, ...] | None = None
    # Keep only the first N rows (None = all): quick experiments on big datasets.
    limit: int | None = None
    # Column renames applied after loading, e.g. {question: prompt} for GSM8K's prompt-only rows.
    rename: dict = field(default_factory=dict)

    def __post_init__(self):
        check_field(
            all(isinstance(k, str) and isinstance(v, str) for k, v in self.rename.items()),
            "rename",
            "must map column names to column names",
        )
        check_field(
            (self.path is None) != (self.rows is None), "path", "give exactly one of 'path' or 'rows'"
        )
        check_field(self.limit is None or self.limit > 0, "limit", f"must be positive, got {self.limit}")

    @classmethod
    def _from_shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"path": value}
        if isinstance(value, (list, tuple)):
            return {"rows": list(value)}
        return value


DATA_FORMATS = (
    "auto",
    "prompt_completion",
    "messages",
    "preference",
    "ranked",
    "prompt_only",
    "text",
    "implicit_preference",
    "unpaired",
)


@dataclass(frozen=True)
class DataConfig:
    """Rows, their format, length limits, padding and order."""

    train: DataSource | None = None
    eval: DataSource | None = None
    # Row format; "auto" detects it from the columns of the first row (see jrft.data.formats).
    format: str = "auto"
    # Longest tokenized row (prompt + completion) a batch may hold; also the packing capacity.
    max_length: int = 1024
    # Preference / prompt-only rows: longest prompt (truncation keeps its end, nearest the answer).
    max_prompt_length: int = 512
    # Preference rows: longest chosen/rejected completion (truncation keeps its start).
    max_completion_length: int = 512
    # What to do with rows over a limit: cut them, skip them (counted and reported), or stop with an error.
    overlong: Literal["truncate", "drop", "fail"] = "truncate"
    # SFT: pack several examples into one row, separated by segment ids (no cross-document attention).
    packing: bool = False
    # Padded lengths: an int pads to multiples of it, a list pads to the smallest entry that fits.
    # Few distinct shapes means few compilations of the jitted step.
    buckets: int | tuple[int, ...] = 64
    # Reshuffle every epoch (from the run seed and the epoch number, so resumption is exact).
    shuffle: bool = True
    # Prepend the tokenizer's BOS token to non-chat rows when it has one (chat templates add their own).
    add_bos: bool = True
    # Append the tokenizer's EOS token to completions so the model learns to stop.
    add_eos: bool = True

    def __post_init__(self):
        check_field(
            self.format in DATA_FORMATS, "format", f"must be one of {DATA_FORMATS}, got {self.format!r}"
        )
        check_positive(self, "max_length", "max_prompt_length", "max_completion_length")
        if isinstance(self.buckets, int):
            check_field(self.buckets > 0, "buckets", f"must be positive, got {self.buckets}")
        else:
            check_field(len(self.buckets) > 0, "buckets", "an empty list of buckets")
            check_field(all(b > 0 for b in self.buckets), "buckets", f"must be positive, got {self.buckets}")
            check_field(
                list(self.buckets) == sorted(set(self.buckets)), "buckets", "must be strictly increasing"
            )


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 takes the remaining devices (at most one axis may be -1)."""

    # Pure data parallelism: replicas of the parameters, the batch split across them.
    data: int = -1
    # Fully sharded data parallelism: parameters and optimizer state split, gathered per layer.
    fsdp: int = 1
    # Tensor parallelism: heads / MLP columns split; for models too large for fsdp alone.
    tensor: int = 1

    def __post_init__(self):
        for name in ("data", "fsdp", "tensor"):
            v = getattr(self, name)
            check_field(v == -1 or v >= 1, name, f"must be -1 or a positive size, got {v}")
        check_field([self.data, self.fsdp, self.tensor].count(-1) <= 1, "data", "at most one axis may be -1")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer (optax) and learning-rate schedule."""

    name: Literal["adamw"] = "adamw"
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # Linear warm-up, lr * step / warmup_steps (above 0 at step 1, as optax/TRL): protects fresh Adam moments
    # from large early updates.
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # Decayed schedules end at lr * min_lr_ratio instead of 0.
    min_lr_ratio: float = 0.0
    # Global gradient-norm clipping (None = off): guards against the rare huge RL/DPO gradient.
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        check_positive(self, "lr", "eps")
        check_nonnegative(self, "weight_decay", "warmup_steps")
        check_field(
            all(0 <= b < 1 for b in self.betas), "betas", f"each beta must be in [0, 1), got {self.betas}"
        )
        check_field(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check_field(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be positive")


SAMPLER_WEIGHTS = ("auto", "gathered", "sharded")  # train.sampler_weights


@dataclass(frozen=True)
class TrainConfig:
    """Loop length, batch geometry, and evaluation / logging / checkpoint cadence."""

    steps: int = 1000
    # Global batch (rows for SFT, pairs for reward/DPO, prompts for GRPO/PPO) per optimizer step.
    batch_size: int = 8
    # Rows per forward/backward (prompts for GRPO/PPO, see grad_accum_for); batch_size / micro_batch_size
    # micro-batches are accumulated (None = no accumulation). Accumulation divides by global token counts,
    # so it equals the full batch.
    micro_batch_size: int | None = None
    eval_every: int = 0  # 0 = never
    eval_batches: int | None = None  # None = the whole eval set
    log_every: int = 10
    save_every: int = 500  # 0 = only at the end
    # Checkpoints kept on disk (older ones are deleted after a newer one is complete).
    keep_last: int = 2
    # Resume automatically from the latest checkpoint in output_dir (a restarted run continues the same run).
    resume: bool = True
    # Where the final transformers-format model is written (None = <output_dir>/export).
    export_dir: str | None = None
    # Memory lever: compute the LM head + log-softmax over sequence chunks of this many positions so the
    # float32 [batch, seq, vocab] logits never exist at once (forward and backward); 0 = off. Same values;
    # costs one extra LM-head matmul in the backward. Worth it for large vocabularies (Llama 3: 128k).
    logits_chunk_size: int = 0
    # Memory lever: keep the frozen reference model (DPO, GRPO with beta > 0, PPO with kl_coef > 0) in
    # pinned host memory and copy it to the device inside each reference forward. Frees one model's worth
    # of device memory per device for a host-to-device transfer per reference call (TPU/GPU).
    offload_reference: bool = False
    # GRPO / PPO sampler: "gathered" gathers the fsdp-sharded weights whole (tensor split kept, compute
    # dtype) once per generate call, so decoding moves no weights; "sharded" leaves them split and the
    # compiler gathers each layer's inside every decode step (compiled for TPU: the whole model over the
    # interconnect per token). "auto": gathered when the sampler's estimate with the gathered copy fits in
    # 90% of a device's memory (or the device does not say: CPU), else sharded.
    sampler_weights: str = "auto"
    # GRPO, PPO and DPO updates: lay each row's real tokens (prompt + completion, or a chosen / rejected
    # sequence) end to end into packed rows with segment ids (first-fit decreasing) instead of padding every
    # row to the longest. Same losses and gradients; fewer positions through the model when lengths vary.
    # (SFT packs in the data pipeline: data.packing.) Single-process runs only.
    pack_rows: bool = False

    def __post_init__(self):
        check_positive(self, "steps", "batch_size", "log_every")
        check_field(
            self.sampler_weights in SAMPLER_WEIGHTS,
            "sampler_weights",
            f"must be one of {', '.join(SAMPLER_WEIGHTS)}, got {self.sampler_weights!r}",
        )
        if self.micro_batch_size is not None:
            check_positive(self, "micro_batch_size")
            check_field(
                self.batch_size % self.micro_batch_size == 0,
                "micro_batch_size",
                f"must divide batch_size={self.batch_size}, got {self.micro_batch_size}",
            )
        check_nonnegative(self, "eval_every", "save_every")
        check_field(self.keep_last >= 1, "keep_last", "must be >= 1")
        check_field(self.logits_chunk_size >= 0, "logits_chunk_size", "must be >= 0 (0 = off)")

    def grad_accum_for(self, rows: int) -> int:
        """Micro-batches for one update over ``rows`` batch rows (rows are prompts for GRPO/PPO:
        micro_batch_size counts prompts there); 1 without accumulation, and at least 1."""
        return 1 if self.micro_batch_size is None else max(rows // self.micro_batch_size, 1)

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step over the whole batch."""
        return self.grad_accum_for(self.batch_size)


@dataclass(frozen=True)
class SFTConfig:
    # Loss only on completion / assistant tokens (TRL's default); False trains on prompts too.
    completion_only_loss: bool = True


@dataclass(frozen=True)
class RewardConfig:
    # bradley_terry: -log sigmoid(r_chosen - r_rejected - margin) on pairs (Ouyang et al. 2022);
    # listwise: Plackett-Luce over a whole ranking (needs format "ranked").
    loss: Literal["bradley_terry", "listwise"] = "bradley_terry"
    # Optional column with a per-pair margin (Llama 2's margin loss, Touvron et al. 2023); None = no margin.
    margin_column: str | None = None
    # Coefficient of the (r_chosen + r_rejected)^2 penalty that keeps rewards centred
    # (Eisenstein et al. 2023).
    center_coefficient: float = 0.0
    # > 0: the reward is the head's score + this x the completion's summed log-prob under the model's own LM
    # head, trained jointly by the same loss (saved with the model: config.json jrft_reward_likelihood_coef;
    # PPO and reward functions score with it). The language model already ranks answers by likelihood.
    likelihood_coef: float = 0.0
    # > 0 (pairs only): adds this x the chosen answer's mean per-token negative log-likelihood to the loss, a
    # text-generation regulariser that keeps the reward model a language model (GRM, arXiv 2406.10216).
    sft_coef: float = 0.0

    def __post_init__(self):
        check_nonnegative(self, "center_coefficient", "likelihood_coef", "sft_coef")
        check_field(
            self.sft_coef == 0 or self.loss == "bradley_terry",
            "sft_coef",
            "the chosen answers' log-likelihood term applies to bradley_terry pairs, not listwise rankings",
        )
        check_field(
            self.margin_column is None or self.loss == "bradley_terry",
            "margin_column",
            "a per-pair margin applies to bradley_terry only, not to listwise rankings",
        )


# Keys of jrft.losses.DPO_LOSSES plus the two losses with their own functions (kept equal by a test).
DPO_LOSS_TYPES = (
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "apo_zero",
    "apo_down",
    "exo_pair",
    "aot",
    "aot_pair",
    "aot_unpaired",
    "discopop",
    "simpo",
    "orpo",
)
# Loss types whose formula reads label_smoothing (jrft.losses.dpo.SMOOTHED_LOSSES, kept equal by a test).
DPO_SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_pair", "aot_unpaired")


@dataclass(frozen=True)
class DPOConfig:
    # Inverse temperature of the implicit reward (Rafailov et al. 2023); larger keeps closer to the reference.
    beta: float = 0.1
    # Variant of the preference loss: a key of jrft.losses.DPO_LOSSES (sigmoid = DPO, hinge = SLiC, ipo,
    # robust, bco_pair, sppo_hard, nca_pair, apo_zero, apo_down, exo_pair, aot, aot_pair (= TRL 1.x's
    # aot_unpaired), discopop), or simpo (reference-free, length-normalised) or orpo (odds ratio + SFT),
    # which have their own loss functions.
    loss_type: str = "sigmoid"
    # Conservative DPO / robust DPO / AOT: assumed probability that a preference label is flipped; EXO's
    # epsilon (must be > 0 for exo_pair; the paper uses 1e-3).
    label_smoothing: float = 0.0
    # DiscoPOP's temperature of the logistic/exponential mixing weight (arXiv 2406.08414: 0.05).
    discopop_tau: float = 0.05
    # Use a uniform reference (no reference model in memory).
    reference_free: bool = False
    # Compute reference log-probs once before training instead of a reference forward each step.
    precompute_ref_logps: bool = False
    # SimPO target reward margin gamma (Meng et al. 2024).
    simpo_gamma: float = 0.5
    # ORPO weight lambda of the odds-ratio term (Hong et al. 2024).
    orpo_lambda: float = 0.1
    # Add an SFT (NLL) term on the chosen completion with this weight (RPO); 0 = off.
    sft_weight: float = 0.0

    def __post_init__(self):
        check_field(
            self.loss_type in DPO_LOSS_TYPES,
            "loss_type",
            f"must be one of {DPO_LOSS_TYPES}, got {self.loss_type!r}",
        )
        check_positive(self, "beta")
        check_field(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        check_field(
            self.label_smoothing == 0 or self.loss_type in DPO_SMOOTHED,
            "label_smoothing",
            f"only the sigmoid and robust (and {', '.join(DPO_SMOOTHED[2:])}) losses use it, "
            f"not {self.loss_type!r}",
        )
        check_field(
            self.loss_type != "exo_pair" or self.label_smoothing > 0,
            "label_smoothing",
            "exo_pair needs label_smoothing > 0 (EXO's epsilon; the paper uses 1e-3)",
        )
        check_nonnegative(self, "sft_weight", "orpo_lambda")
        check_positive(self, "discopop_tau")


@dataclass(frozen=True)
class KTOConfig:
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306) on unpaired rows (``prompt``, ``completion``,
    ``label``), against a frozen reference."""

    # Inverse temperature of the implicit reward, as DPO's.
    beta: float = 0.1
    # lambda_D and lambda_U: weights of desirable and undesirable rows; the paper keeps
    # lambda_D n_D / (lambda_U n_U) in [1, 4/3], so raise the rarer kind's weight on unbalanced data.
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # Compute reference log-probs once before training instead of a reference forward each step.
    precompute_ref_logps: bool = False

    def __post_init__(self):
        check_positive(self, "beta", "desirable_weight", "undesirable_weight")


@dataclass(frozen=True)
class RewardFunctionConfig:
    """One reward function: a built-in by ``name``, a user function by ``spec`` (module:function or
    path/to/file.py:function) or a trained reward model by ``reward_model`` (a ``jrft reward`` export or a
    transformers sequence-classification model, scored on the device), its weight in the combination, and
    keyword arguments."""

    name: str | None = None
    spec: str | None = None
    reward_model: str | None = None
    weight: float = 1.0
    # Options of a built-in (e.g. {tolerance: 1e-6}); user functions take none.
    kwargs: dict = field(default_factory=dict)
    # Metric name (default: the function's name); useful when one built-in appears twice.
    label: str | None = None
    # Run in a worker process (killable on timeout; os._exit or a crash cannot take the trainer down) or in
    # a thread of the trainer (false: shares its state, e.g. jax.process_index()). Default (null): a worker
    # process for user functions (spec), a thread for built-ins.
    process: bool | None = None

    def __post_init__(self):
        given = [k for k in ("name", "spec", "reward_model") if getattr(self, k) is not None]
        check_field(
            len(given) == 1, "name", f"give exactly one of 'name', 'spec' or 'reward_model', got {given}"
        )
        check_field(
            self.reward_model is None or not self.kwargs, "kwargs", "a reward model entry takes no kwargs"
        )
        check_field(
            self.reward_model is None or not self.process,
            "process",
            "a reward model runs on the device in the trainer (not in a worker process)",
        )
        check_field(
            self.spec is None or ":" in self.spec, "spec", f"expected module:function, got {self.spec!r}"
        )

    def as_runner_spec(self) -> dict:
        """The entry ``jrft.rewards.RewardRunner.from_config`` takes: ``{"name", "weight", ...kwargs}``
        (a user function's ``module:function`` goes under ``name`` there)."""
        if self.reward_model is not None:  # built by the run (it needs the mesh), not by the registry
            return {"reward_model": self.reward_model, "weight": self.weight, "label": self.label}
        entry = {
            "name": self.name if self.name is not None else self.spec,
            "weight": self.weight,
            **self.kwargs,
        }
        if self.label is not None:
            entry["label"] = self.label
        if self.process is not None:
            entry["process"] = self.process
        return entry


@dataclass(frozen=True)
class ToolConfig:
    """A tool the GRPO policy may call: a built-in by ``name`` (``python``: the code sandbox) or a function
    with type hints and a docstring by ``spec`` (module:function or path/to/file.py:function)."""

    name: str | None = None
    spec: str | None = None

    def __post_init__(self):
        check_field(
            (self.name is None) != (self.spec is None), "name", "give exactly one of 'name' or 'spec'"
        )
        check_field(
            self.spec is None or ":" in self.spec, "spec", f"expected module:function, got {self.spec!r}"
        )

    def as_entry(self) -> dict:
        return {"name": self.name} if self.name is not None else {"spec": self.spec}


@dataclass(frozen=True)
class SamplingConfig:
    """Rollout sampling shared by GRPO and PPO."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def _check_sampling(self):
        check_positive(self, "max_new_tokens")
        check_field(
            self.temperature > 0, "temperature", "must be positive (greedy rollouts give GRPO no signal)"
        )
        check_field(self.top_k is None or self.top_k > 0, "top_k", "must be positive")
        check_field(self.top_p is None or 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")


@dataclass(frozen=True)
class RewardSettings:
    """Reward functions, how they combine, and completion logging, shared by GRPO and PPO."""

    # Scored on every rollout; GRPO needs at least one, PPO may use a reward model instead or as well.
    reward_functions: tuple[RewardFunctionConfig, ...] = ()
    # How several reward functions combine (jrft.rewards.combine): weighted sum of those that applied, or
    # each normalised within its group first (GDPO) so no reward's scale drowns the others.
    reward_combine: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    # Seconds a reward call may take before its results count as failed (None) and are reported.
    reward_timeout_s: float = 60.0
    # Write a table of sample completions with their rewards every N steps (0 = never).
    log_completions_every: int = 10
    # Held-out evaluation (data.eval, every train.eval_every steps): a sampled completion passes for pass@k
    # when its reward (each function's, and the weighted sum) is at least this (1.0: e.g. a correct answer).
    eval_pass_threshold: float = 1.0

    def _check_rewards(self):
        check_positive(self, "reward_timeout_s")
        check_nonnegative(self, "log_completions_every")


@dataclass(frozen=True)
class GRPOConfig(RewardSettings, SamplingConfig):
    """Group Relative Policy Optimization (Shao et al. 2024, arXiv 2402.03300) and its variants."""

    # G completions per prompt; advantages are relative to the group.
    num_generations: int = 8
    # KL penalty weight to the frozen reference; 0 skips reference log-probs entirely.
    beta: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    # Clipping range of the ratio: [1 - epsilon_low, 1 + epsilon_high]; epsilon_high > epsilon_low is
    # DAPO's clip-higher (Yu et al. 2025), which keeps exploration alive.
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    # How token losses are reduced: grpo (per-sequence mean, then mean), bnpo (batch token mean),
    # dr_grpo (sum / (rows * max_new_tokens), Liu et al. 2025), dapo (token mean over the global batch);
    # as TRL's loss_type, two also change the per-token term: cispo (MiniMax-M1: clipped, detached IS weight
    # times the log-prob; token mean; epsilon_high is then the cap eps_max on the weight, e.g. 5.0) and sapo
    # (soft sigmoid gate instead of the clip; per-sequence mean).
    loss_aggregation: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"] = "dapo"
    # SAPO's gate temperatures for positive / other advantages (arXiv 2511.20347; TRL's defaults).
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    # token: per-token ratios (PPO/GRPO); sequence: GSPO's length-normalised sequence ratio
    # (Zheng et al. 2025); sequence_token: GSPO-token (sequence ratio value, per-token gradients).
    importance_level: Literal["token", "sequence", "sequence_token"] = "token"
    # Advantage normalisation: by the group's std, the batch's std, or none (Dr. GRPO).
    scale_rewards: Literal["group", "batch", "none"] = "group"
    # Which std scale_rewards divides by: population (divide by n; the default, so that a group's scaled
    # advantages have unit RMS whatever G, and runs from before this option keep their numbers) or sample
    # (n - 1, TRL's nanstd: advantages sqrt(G / (G - 1)) smaller, 1.155x at G = 4; for parity with TRL).
    reward_std: Literal["population", "sample"] = "population"
    # Baseline subtracted from rewards: the group mean (GRPO), the mean of the other G-1 samples (RLOO,
    # Ahmadian et al. 2024), the batch mean, or none.
    baseline: Literal["group_mean", "rloo", "batch_mean", "none"] = "group_mean"
    # mu: update iterations per generation round (mu = 1 makes the ratio exactly 1 at the first step).
    num_iterations: int = 1
    # Mini-batches per generation round (each iteration passes over all of them).
    num_mini_batches: int = 1
    # Old log-probs from the sampler (free) or recomputed by a training-mode forward (exact for mu > 1).
    old_logprobs: Literal["sampler", "recompute"] = "recompute"
    # DAPO dynamic sampling: drop groups with zero reward variance (no signal) and sample again ...
    dynamic_sampling: bool = False
    # ... at most this many extra rounds per step (then train on what there is).
    max_sampling_rounds: int = 4
    # Exclude completions cut at max_new_tokens from the loss (DAPO's overlong filtering).
    mask_truncated_completions: bool = False
    # DAPO soft overlong punishment: linear penalty over the last `overlong_buffer` tokens (0 = off).
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    # Multi-turn (jrft.agentic): tools the model may call mid-completion (their JSON schemas go to the
    # chat template as tools=), or an environment class (file.py:Class with reset(row) and step(text)).
    # With either, max_new_tokens is the budget of the whole continuation (model and tool tokens).
    tools: tuple[ToolConfig, ...] = ()
    environment: str | None = None
    # Model turns per trajectory at most (multi-turn only).
    max_turns: int = 4
    # How tool calls are read from the model's text: hermes (<tool_call>{json}</tool_call>, Qwen's format)
    # or a module:function spec.
    tool_parser: str = "hermes"
    # Seconds a tool call may take before its worker process is killed and the model gets an error.
    tool_timeout_s: float = 10.0

    def __post_init__(self):
        self._check_sampling()
        self._check_rewards()
        check_field(self.max_turns >= 1, "max_turns", "must be >= 1")
        check_positive(self, "tool_timeout_s")
        check_field(
            not (self.tools and self.environment), "environment", "give tools or an environment, not both"
        )
        check_field(
            self.environment is None or ":" in self.environment,
            "environment",
            f"expected file.py:Class or module:Class, got {self.environment!r}",
        )
        check_field(
            self.num_generations >= 2, "num_generations", "must be >= 2 (advantages are group-relative)"
        )
        check_nonnegative(self, "beta", "epsilon_low", "epsilon_high")
        check_positive(self, "sapo_temperature_pos", "sapo_temperature_neg")
        check_field(
            self.loss_aggregation != "cispo" or self.epsilon_high >= 1.0,
            "epsilon_high",
            "with cispo it is the cap eps_max on the importance weight (TRL's convention; ScaleRL uses 5.0): "
            f"must be >= 1, got {self.epsilon_high}",
        )
        check_field(self.num_iterations >= 1, "num_iterations", "must be >= 1")
        check_field(self.num_mini_batches >= 1, "num_mini_batches", "must be >= 1")
        check_field(self.max_sampling_rounds >= 1, "max_sampling_rounds", "must be >= 1")
        check_field(
            0 <= self.overlong_buffer < self.max_new_tokens,
            "overlong_buffer",
            "must be in [0, max_new_tokens)",
        )


@dataclass(frozen=True)
class PPOConfig(RewardSettings, SamplingConfig):
    """PPO for RLHF (Schulman et al. 2017; Ouyang et al. 2022) with a learned value function and GAE."""

    # Value model: a separate decoder with a scalar head, or a scalar head on the policy (less memory).
    value_model: Literal["separate", "head"] = "separate"
    # Where the separate value model starts from (None = the reward model, else the policy).
    value_model_path: str | None = None
    vf_coef: float = 0.1
    # Policy ratio clipping epsilon.
    cliprange: float = 0.2
    # Value clipping around the old values (PPO2).
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95  # GAE lambda (Schulman et al. 2016)
    # Per-token KL penalty to the frozen reference, subtracted from the reward.
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    # Reward subtracted from completions that never emitted EOS (None = off).
    missing_eos_penalty: float | None = None
    # A reward-model checkpoint trained by `jrft reward` (None = reward functions only).
    reward_model: str | None = None
    # PPO epochs over each rollout batch, split into this many mini-batches.
    num_epochs: int = 4
    num_mini_batches: int = 1

    def __post_init__(self):
        self._check_sampling()
        self._check_rewards()
        check_nonnegative(self, "vf_coef", "kl_coef")
        check_positive(self, "cliprange", "cliprange_value")
        check_field(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]")
        check_field(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        check_field(self.num_epochs >= 1, "num_epochs", "must be >= 1")
        check_field(self.num_mini_batches >= 1, "num_mini_batches", "must be >= 1")


OBJECTIVES = ("sft", "reward", "dpo", "kto", "grpo", "ppo")
# Metric sinks of jrft.train.metrics.REPORT_TO (copied so loading a config does not import JAX; a test keeps
# them equal); TRL's "all" and "none" are accepted too.
REPORT_TO = ("jsonl", "tensorboard", "wandb")


@dataclass(frozen=True)
class RunConfig:
    """A whole run. Only the section of the chosen ``objective`` is used by its trainer."""

    objective: Literal["sft", "reward", "dpo", "kto", "grpo", "ppo"] = "sft"
    # Everything random (init, data order, sampling) derives from this seed: a run is a function of its
    # config.
    seed: int = 0
    # Checkpoints, metrics and the export live here; a rerun with the same output_dir resumes.
    output_dir: str = "runs/default"
    # Where metrics go: any of jsonl, tensorboard, wandb (W&B: pip install 'jrft[wandb]'), or TRL's "all" /
    # "none". Without jsonl, metrics.jsonl is not written (the console still shows every logged step).
    report_to: tuple[str, ...] | str = ("jsonl", "tensorboard")
    model: ModelSource = field(default_factory=ModelSource)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def __post_init__(self):
        check_nonnegative(self, "seed")
        check_field(bool(self.output_dir), "output_dir", "must not be empty")
        names = (self.report_to,) if isinstance(self.report_to, str) else self.report_to
        bad = [n for n in names if n not in (*REPORT_TO, "all", "none")]
        check_field(not bad, "report_to", f"unknown {bad}; choose from {[*REPORT_TO, 'all', 'none']}")
        d = self.data
        if self.objective in ("dpo", "reward", "kto"):
            check_field(
                d.max_prompt_length + d.max_completion_length <= d.max_length or d.overlong == "truncate",
                "data.max_length",
                "max_prompt_length + max_completion_length exceeds max_length with overlong != truncate",
            )
        if self.objective == "reward" and self.reward.loss == "listwise":
            check_field(d.format in ("auto", "ranked"), "reward.loss", "listwise needs data.format 'ranked'")
        # A reward is checked only for the objective that uses it, so other objectives' configs need not
        # mention GRPO / PPO at all.
        if self.objective == "ppo":
            check_field(
                self.ppo.reward_model is not None or len(self.ppo.reward_functions) > 0,
                "ppo.reward_model",
                "PPO needs a reward: set ppo.reward_model and/or ppo.reward_functions",
            )
            check_field(
                self.train.batch_size % self.ppo.num_mini_batches == 0,
                "ppo.num_mini_batches",
                f"must divide train.batch_size={self.train.batch_size}",
            )
        if self.objective == "grpo":
            check_field(
                len(self.grpo.reward_functions) > 0 or self.grpo.environment is not None,
                "grpo.reward_functions",
                "GRPO needs at least one (or an environment that gives rewards)",
            )
            check_field(
                self.train.batch_size % self.grpo.num_mini_batches == 0,
                "grpo.num_mini_batches",
                f"must divide train.batch_size={self.train.batch_size}",
            )

    @property
    def report_sinks(self) -> tuple[str, ...]:
        """``report_to`` as a tuple of sinks ("all": every one, "none": no file, console only)."""
        names = (self.report_to,) if isinstance(self.report_to, str) else tuple(self.report_to)
        if "all" in names:
            return REPORT_TO
        return tuple(n for n in REPORT_TO if n in names)

    def to_dict(self) -> dict:
        """Plain nested dict (lists for tuples) for logs, YAML and checkpoint metadata."""
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: Sequence[str]) -> RunConfig:
        """A new config with dotted ``key=value`` overrides applied, as strictly as on the command line
        (e.g. a demo deriving its GRPO stage from its SFT stage)."""
        try:
            return _overridden(self, overrides)
        except ConfigError as e:
            raise ConfigError(f"overrides: {e.message}", e.key) from None


def _to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------
# Strict building from plain data
# ---------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({'; '.join(errors)})", key)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}", key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}", key)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}.{i}") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}", key)
        return tuple(_coerce(a, v, f"{key}.{i}") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}", key)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config field {key} has an unsupported type {tp!r}")  # a bug in this module
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})", key)


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and ill-typed values by dotted key."""
    shorthand = getattr(cls, "_from_shorthand", None)
    if shorthand is not None:
        data = shorthand(data)
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or '<top level>'}: expected a mapping, got {data!r}", prefix)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    dot = f"{prefix}." if prefix else ""
    for k in data:
        if k not in known:
            raise ConfigError(f"{dot}{k}: unknown key (known keys: {', '.join(known)})", f"{dot}{k}")
    kwargs = {k: _coerce(hints[k], v, f"{dot}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        full = e.key if e.key and "." in e.key else f"{dot}{e.key}"
        raise ConfigError(f"{full}: {e.message}", full) from None


# ---------------------------------------------------------------------------------------------------------
# TRL's names: one table of aliases, resolved before building
# ---------------------------------------------------------------------------------------------------------

# TRL's name of a setting (dotted, where it sits in a jrft config) -> jrft's dotted key. A TRL user's config
# or override loads unchanged; the resolved config (``--print-config``, checkpoints, logs) carries jrft's
# names. TrainingArguments names are also accepted flat at the top level, as in a TRL config. Giving both
# names of one setting is an error naming both. Values are TRL's too (loss_type: dapo, ...).
TRL_ALIASES: dict[str, str] = {
    "learning_rate": "optim.lr",
    "optim.learning_rate": "optim.lr",
    "warmup_steps": "optim.warmup_steps",
    "weight_decay": "optim.weight_decay",
    "max_grad_norm": "optim.max_grad_norm",
    "max_steps": "train.steps",
    "train.max_steps": "train.steps",
    "save_steps": "train.save_every",
    "train.save_steps": "train.save_every",
    "save_total_limit": "train.keep_last",
    "train.save_total_limit": "train.keep_last",
    "logging_steps": "train.log_every",
    "train.logging_steps": "train.log_every",
    "eval_steps": "train.eval_every",
    "train.eval_steps": "train.eval_every",
    "grpo.epsilon": "grpo.epsilon_low",
    "grpo.loss_type": "grpo.loss_aggregation",
    "grpo.importance_sampling_level": "grpo.importance_level",
    "grpo.max_completion_length": "grpo.max_new_tokens",
    "grpo.multi_objective_aggregation": "grpo.reward_combine",
    "ppo.max_completion_length": "ppo.max_new_tokens",
    "ppo.response_length": "ppo.max_new_tokens",
    "ppo.multi_objective_aggregation": "ppo.reward_combine",
    "ppo.num_ppo_epochs": "ppo.num_epochs",
    "dpo.precompute_ref_log_probs": "dpo.precompute_ref_logps",
    "kto.precompute_ref_log_probs": "kto.precompute_ref_logps",
}
# TRL's per-function weights as one list, set on the entries of reward_functions in order.
REWARD_WEIGHT_LISTS = ("grpo.reward_weights", "ppo.reward_weights")


def _find(data: Any, dotted: str) -> tuple[bool, Any]:
    node = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _pop(data: dict, dotted: str) -> tuple[bool, Any]:
    *parents, last = dotted.split(".")
    found, node = _find(data, ".".join(parents)) if parents else (True, data)
    if not found or not isinstance(node, dict) or last not in node:
        return False, None
    return True, node.pop(last)


def _put(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"{part}: expected a mapping, got {node[part]!r}", part)
        node = node[part]
    node[last] = value


def _copy_sections(data: Mapping) -> dict:
    """A copy of ``data`` whose nested mappings are fresh dicts (lists of mappings too): safe to rewrite."""
    if isinstance(data, Mapping):
        return {k: _copy_sections(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_copy_sections(v) for v in data]
    return data


def resolve_trl_names(data: Mapping) -> dict:
    """Plain config data with TRL's names (:data:`TRL_ALIASES`, ``reward_weights``) moved to jrft's keys.

    Raises:
      ConfigError: when a setting is given under both names (the message names both).
    """
    data = _copy_sections(data)
    given_as: dict[str, str] = {}
    for alias, key in TRL_ALIASES.items():
        found, value = _pop(data, alias)
        if not found:
            continue
        if key in given_as or _find(data, key)[0]:
            other = given_as.get(key, key)
            raise ConfigError(f"{alias} and {other} are two names for {key}: give one", key)
        _put(data, key, value)
        given_as[key] = alias
        if alias == "grpo.epsilon" and not _find(data, "grpo.epsilon_high")[0]:
            _put(data, "grpo.epsilon_high", value)  # TRL's rule: epsilon_high defaults to epsilon
    for alias in REWARD_WEIGHT_LISTS:
        found, weights = _pop(data, alias)
        if found:
            _set_reward_weights(data, alias, weights, strict=True)
    return data


def _set_reward_weights(data: dict, alias: str, weights: Any, strict: bool) -> None:
    section = alias.split(".")[0]
    functions = _find(data, f"{section}.reward_functions")[1] or []
    if not isinstance(weights, list) or len(weights) != len(functions):
        raise ConfigError(
            f"{alias}: expected a list of {len(functions)} weights (one per function), got {weights!r}",
            alias,
        )
    for i, (entry, weight) in enumerate(zip(functions, weights, strict=True)):
        if not isinstance(entry, dict):
            raise ConfigError(f"{section}.reward_functions.{i}: expected a mapping, got {entry!r}", alias)
        if strict and "weight" in entry:
            key = f"{section}.reward_functions.{i}.weight"
            raise ConfigError(f"{alias} and {key} are two names for {key}: give one", key)
        entry["weight"] = weight


def _canonical_overrides(overrides: Sequence[str]) -> list[str]:
    """Overrides with TRL's keys rewritten to jrft's; two overrides of one setting under its two names
    are an error naming both."""
    out, given_as = [], {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        canonical = TRL_ALIASES.get(key, key)
        if canonical != key or key in TRL_ALIASES.values():
            other = given_as.setdefault(canonical, key)
            if other != key:
                raise ConfigError(f"{key} and {other} are two names for {canonical}: give one", canonical)
        extra = []
        if key == "grpo.epsilon" and "grpo.epsilon_high" not in given_as:
            extra = [f"grpo.epsilon_high={raw}"]  # TRL's rule: epsilon_high defaults to epsilon
        out += [f"{canonical}{sep}{raw}" if sep else item, *extra]
    return out


def config_from_dict(data: Mapping, cls: type = RunConfig) -> Any:
    """Build a config dataclass from plain nested data (strict; errors name the dotted key). A
    :class:`RunConfig` also accepts TRL's names of its settings (:data:`TRL_ALIASES`)."""
    if cls is RunConfig and isinstance(data, Mapping):
        data = resolve_trl_names(data)
    return _build(cls, data, "")


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to nested plain data, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=1e-4)", item)
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: malformed key {key!r}", key)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse {raw!r} as YAML ({e})", key) from None
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            here = ".".join(parts[: i + 1])
            if isinstance(node, list):  # an index into a list, e.g. grpo.reward_functions.0.weight
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {key}: {here}: no such list item", key)
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[:i])} is not a section", key)
            if last:
                node[part] = value
            else:
                child = node.get(part) if isinstance(node, dict) else node[part]
                if child is None:  # e.g. data.eval.path=... when eval was unset
                    node[part] = {}
                node = node[part]
    return data


def _overridden(config: T, overrides: Sequence[str]) -> T:
    # Overrides apply to the fully expanded config, so every section (and shorthand) is a mapping.
    plain = _to_plain(dataclasses.asdict(config))
    if type(config) is RunConfig:
        plain = apply_overrides(plain, _canonical_overrides(overrides))
        for alias in REWARD_WEIGHT_LISTS:  # on the expanded config every entry has a weight: replace them
            found, weights = _pop(plain, alias)
            if found:
                _set_reward_weights(plain, alias, weights, strict=False)
        return config_from_dict(plain, RunConfig)
    return config_from_dict(apply_overrides(plain, overrides), type(config))


def _read_yaml_mapping(path: str | os.PathLike) -> dict:
    where = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{where}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{where}: the top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def load_yaml_config(path: str | os.PathLike | None, overrides: Sequence[str], cls: type[T]) -> T:
    """Load config dataclass ``cls`` from a YAML file (or its defaults when ``path`` is None) plus dotted
    ``key=value`` overrides, strictly (see the module docstring).

    Raises:
      ConfigError: whose message starts with the file ("defaults" without one, "<file> + command line
        overrides" for an error an override introduced) and names the full dotted key.
    """
    where = "defaults" if path is None else os.fspath(path)
    data = {} if path is None else _read_yaml_mapping(path)
    try:
        config = config_from_dict(data, cls)  # errors in the file are reported against the file ...
    except ConfigError as e:
        raise ConfigError(f"{where}: {e.message}", e.key) from None
    if not overrides:
        return config
    try:
        return _overridden(config, overrides)
    except ConfigError as e:  # ... and errors introduced by overrides against the command line
        raise ConfigError(f"{where} + command line overrides: {e.message}", e.key) from None


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a :class:`RunConfig` from a YAML file (or defaults when ``path`` is None) plus overrides.

    Errors are :class:`ConfigError` whose message starts with the file (or "command line") and names
    the full dotted key.
    """
    return load_yaml_config(path, overrides, RunConfig)
