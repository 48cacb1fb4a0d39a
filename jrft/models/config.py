"""``ModelConfig``: one frozen description of a decoder, built from (and written back to) transformers'
``config.json``.

Families are registered in ``FAMILIES`` (model_type -> small reader/writer pair), not in if-chains:

* ``llama``  — Llama 1/2/3.x; rope types ``default``, ``linear``, ``llama3`` (Llama 3.1 scaling) and ``yarn``.
* ``qwen2``  — Qwen2 / Qwen2.5: bias on the q/k/v projections.
* ``qwen3``  — Qwen3 (dense): RMSNorm over each head of q and k before RoPE (no projection bias by default).
* ``gemma``  — Gemma 1: GeGLU (tanh-approximate GELU), embeddings scaled by sqrt(hidden), RMSNorm with
  ``(1 + w)``, tied embeddings.
* ``gemma2`` — Gemma 2: Gemma 1 plus RMSNorms on the attention and MLP outputs ("sandwich" norms),
  ``query_pre_attn_scalar``, tanh soft-capping of attention scores and final logits, and sliding-window
  attention on the layers ``layer_types`` marks. (Gemma 3 is not supported.)

Keys of ``config.json`` that jrft does not model (token ids, ``initializer_range``, ...) are kept verbatim in
``hf_extra`` so that ``to_hf()`` writes them back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

# Keys that ModelConfig models itself (or that transformers recomputes); never copied into hf_extra.
_MODELLED_KEYS = {
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "attention_bias",
    "hidden_act",
    "hidden_activation",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "jrft_reward_likelihood_coef",
}

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and variant of a decoder-only transformer.

    Hashable (it is static data of the flax module and of jitted functions), so dict-valued settings are kept
    as sorted tuples of pairs.
    """

    family: str  # transformers model_type: llama | qwen2 | qwen3 | gemma | gemma2
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # Extra rope parameters (factor, low_freq_factor, ...), sorted (key, value) pairs.
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    tie_embeddings: bool = False
    qkv_bias: bool = False  # qwen2; llama/qwen3 with attention_bias=True
    o_bias: bool = False  # llama/qwen3 with attention_bias=True (qwen2 never)
    qk_norm: bool = False  # qwen3: RMSNorm over head_dim of q and k
    norm_plus_one: bool = False  # gemma: RMSNorm scales by (1 + w)
    scale_embeddings: bool = False  # gemma: embeddings * sqrt(hidden_size)
    hidden_act: str = "silu"  # silu (SwiGLU) | gelu_pytorch_tanh (GeGLU)
    # Gemma 2 (None / False / () elsewhere):
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs before each residual add
    query_pre_attn_scalar: float | None = None  # scores scaled by this ** -0.5 instead of head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    sliding_window: int | None = None  # keys at most this many slots back (exclusive), on sliding layers
    sliding_layers: tuple[bool, ...] = ()  # per layer: True = sliding-window attention
    # Reward models: the score is the scalar head at the last token + this x the summed log-prob of the
    # completion under the model's own LM head (jrft.train.objectives.reward.sequence_rewards); 0 = head only.
    # Saved as config.json's ``jrft_reward_likelihood_coef`` (absent when 0).
    reward_likelihood_coef: float = 0.0
    # Unmodelled config.json entries, (key, json-encoded value) pairs, written back by to_hf().
    hf_extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(
                f"ModelConfig.family: unsupported {self.family!r}; supported: {sorted(FAMILIES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig: num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"ModelConfig.rope_type: unsupported {self.rope_type!r}; supported: {ROPE_TYPES}"
            )
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ValueError(
                f"ModelConfig.sliding_layers: {len(self.sliding_layers)} entries for {self.num_layers} layers"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"ModelConfig.hidden_act: unsupported {self.hidden_act!r}; supported: {ACTIVATIONS}"
            )
        if not self.reward_likelihood_coef >= 0:
            raise ValueError(
                f"ModelConfig.reward_likelihood_coef must be >= 0, got {self.reward_likelihood_coef}"
            )

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def rope_params(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @property
    def extra(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.hf_extra}

    @property
    def num_params(self) -> int:
        """Parameter count (without a scalar head)."""
        d, f, h, kv, hd = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        attn = d * h * hd * 2 + d * kv * hd * 2
        attn += (h * hd + 2 * kv * hd) * self.qkv_bias + d * self.o_bias + 2 * hd * self.qk_norm
        per_layer = attn + 3 * d * f + 2 * d * (2 if self.post_norms else 1)
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embed + d

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> ModelConfig:
        """Builds a ModelConfig from a ``config.json`` dict, a path to one, or a directory holding one."""
        source = "<dict>"
        if not isinstance(config, Mapping):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"ModelConfig.from_hf: no config.json at {path}")
            source = path
            with open(path) as f:
                config = json.load(f)
        model_type = config.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(
                f"{source}: unsupported model_type {model_type!r}; jrft supports {sorted(FAMILIES)}"
            )
        try:
            return FAMILIES[model_type].read(dict(config))
        except KeyError as e:
            raise ValueError(f"{source}: config.json lacks the field {e.args[0]!r}") from None
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf(self, architecture: str | None = None) -> dict[str, Any]:
        """The ``config.json`` dict transformers needs to rebuild this model (``architectures`` set to
        ``architecture`` or the family's causal-LM class)."""
        family = FAMILIES[self.family]
        out = self.extra
        out.update(
            model_type=self.family,
            architectures=[architecture or family.architecture],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": self.rope_type, "rope_theta": self.rope_theta, **self.rope_params},
            tie_word_embeddings=self.tie_embeddings,
            hidden_act=self.hidden_act,
        )
        if self.reward_likelihood_coef:
            out["jrft_reward_likelihood_coef"] = self.reward_likelihood_coef
        family.write(self, out)
        return out


# --- family readers / writers -------------------------------------------------------------------


def _rope_from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    """Normalises v5 ``rope_parameters`` and the legacy ``rope_theta`` + ``rope_scaling`` pair."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    for k, v in legacy.items():
        params.setdefault("rope_type" if k == "type" else k, v)
    theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    params.pop("partial_rotary_factor", None)
    if rope_type == "default":
        params = {}
    if rope_type == "yarn" and "original_max_position_embeddings" not in params:
        raise ValueError("rope_type 'yarn' needs rope_parameters.original_max_position_embeddings")
    if rope_type == "yarn" and params.get("factor") is None:  # transformers' default for a missing factor
        params["factor"] = cfg["max_position_embeddings"] / params["original_max_position_embeddings"]
    return dict(rope_theta=float(theta), rope_type=rope_type, rope_scaling=tuple(sorted(params.items())))


def _common_from_hf(cfg: dict[str, Any], **family_fields) -> ModelConfig:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    act = cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"
    if act in ("gelu", "gelu_new", "gelu_fast") and cfg["model_type"] == "gemma":
        act = "gelu_pytorch_tanh"  # Gemma 1 checkpoints name the tanh approximation "gelu"
    extra = {k: v for k, v in cfg.items() if k not in _MODELLED_KEYS}
    return ModelConfig(
        family=cfg["model_type"],
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", family_fields.pop("default_tie", False))),
        hidden_act=act,
        hf_extra=tuple(sorted((k, json.dumps(v)) for k, v in extra.items())),
        reward_likelihood_coef=float(cfg.get("jrft_reward_likelihood_coef", 0.0)),
        **_rope_from_hf(cfg),
        **family_fields,
    )


def _read_llama(cfg):
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    bias = bool(cfg.get("attention_bias", False))
    return _common_from_hf(cfg, qkv_bias=bias, o_bias=bias)


def _write_llama(mc, out):
    out["attention_bias"] = mc.qkv_bias


def _no_sliding_window(cfg):
    if cfg.get("use_sliding_window"):
        raise ValueError("use_sliding_window=True is not supported")


def _read_qwen2(cfg):
    _no_sliding_window(cfg)
    return _common_from_hf(cfg, qkv_bias=True, o_bias=False)


def _write_qwen2(mc, out):
    pass


def _read_qwen3(cfg):
    _no_sliding_window(cfg)
    bias = bool(cfg.get("attention_bias", False))
    return _common_from_hf(cfg, qkv_bias=bias, o_bias=bias, qk_norm=True)


def _read_gemma(cfg):
    return _common_from_hf(cfg, norm_plus_one=True, scale_embeddings=True, default_tie=True)


def _read_gemma2(cfg):
    n = cfg["num_hidden_layers"]
    # transformers' default: layers 0, 2, 4, ... slide, the others attend globally
    default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    types = cfg.get("layer_types") or default
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"layer_types {unknown} are not supported")
    window = cfg.get("sliding_window")
    return _common_from_hf(
        cfg,
        norm_plus_one=True,
        scale_embeddings=True,
        default_tie=True,
        post_norms=True,
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
        attn_softcap=cfg.get("attn_logit_softcapping"),
        final_softcap=cfg.get("final_logit_softcapping"),
        sliding_window=window,
        sliding_layers=tuple(t == "sliding_attention" for t in types) if window else (),
    )


def _write_gemma2(mc, out):
    out.update(
        attention_bias=mc.qkv_bias,
        hidden_activation=mc.hidden_act,
        query_pre_attn_scalar=mc.query_pre_attn_scalar,
        attn_logit_softcapping=mc.attn_softcap,
        final_logit_softcapping=mc.final_softcap,
        sliding_window=mc.sliding_window,
        layer_types=[
            "sliding_attention" if mc.sliding_layers and mc.sliding_layers[i] else "full_attention"
            for i in range(mc.num_layers)
        ],
    )


@dataclasses.dataclass(frozen=True)
class Family:
    architecture: str  # transformers causal-LM class written to config.json
    read: Callable[[dict[str, Any]], ModelConfig]
    write: Callable[[ModelConfig, dict[str, Any]], None]
    classifier: str  # ...ForSequenceClassification class (reward/value models)


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", _read_llama, _write_llama, "LlamaForSequenceClassification"),
    "qwen2": Family("Qwen2ForCausalLM", _read_qwen2, _write_qwen2, "Qwen2ForSequenceClassification"),
    "qwen3": Family("Qwen3ForCausalLM", _read_qwen3, _write_llama, "Qwen3ForSequenceClassification"),
    "gemma": Family("GemmaForCausalLM", _read_gemma, _write_llama, "GemmaForSequenceClassification"),
    "gemma2": Family("Gemma2ForCausalLM", _read_gemma2, _write_gemma2, "Gemma2ForSequenceClassification"),
}
