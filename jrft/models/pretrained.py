"""transformers checkpoints <-> jrft ``Decoder``: ``from_pretrained`` and ``save_pretrained``.

Reading parses safetensors files directly with numpy (no torch, no memory map). transformers stores linear
weights ``[out, in]`` and one tensor per layer; jrft keeps ``[in, out]`` split into heads and stacks layers.
The name/layout table is ``HF_TENSORS``. Every expected tensor is checked (present, right shape) from the file
headers BEFORE any array is built, and each parameter goes straight onto its ``NamedSharding`` (each device
receives only its slice).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
import uuid
import zlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from safetensors.numpy import save_file

from jrft.config import PEFT_WEIGHTS
from jrft.models.config import FAMILIES, ModelConfig
from jrft.models.decoder import Decoder, layer_param_specs
from jrft.models.lora import LoRAParam, LoRASpec, merged_layer_arrays
from jrft.models.lora import host_init as lora_host_init
from jrft.models.quant import FORMATS, QUANT_WEIGHTS
from jrft.parallel.distributed import host_array
from jrft.parallel.sharding import AxisRule, logical_axes_of, logical_to_spec

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# jrft parameter path -> (transformers tensor name, layout): layout n >= 1 is a linear weight whose first n
# jrft dims are the matmul's "in" side (transformers: [out, in]); 0 a vector flattened in transformers
# (biases split into heads in jrft); None the same shape in both. ``{i}`` marks a per-layer tensor (stacked
# along jrft's leading ``layers`` axis).
_L = "model.layers.{i}."
HF_TENSORS: dict[str, tuple[str, int | None]] = {
    "embed": ("model.embed_tokens.weight", None),
    "final_norm": ("model.norm.weight", None),
    "lm_head": ("lm_head.weight", 1),
    "scalar_head/kernel": ("score.weight", 1),
    "layers/attn_norm": (_L + "input_layernorm.weight", None),
    "layers/wq": (_L + "self_attn.q_proj.weight", 1),
    "layers/wk": (_L + "self_attn.k_proj.weight", 1),
    "layers/wv": (_L + "self_attn.v_proj.weight", 1),
    "layers/wo": (_L + "self_attn.o_proj.weight", 2),
    "layers/bq": (_L + "self_attn.q_proj.bias", 0),
    "layers/bk": (_L + "self_attn.k_proj.bias", 0),
    "layers/bv": (_L + "self_attn.v_proj.bias", 0),
    "layers/bo": (_L + "self_attn.o_proj.bias", None),
    "layers/q_norm": (_L + "self_attn.q_norm.weight", None),
    "layers/k_norm": (_L + "self_attn.k_norm.weight", None),
    "layers/mlp_norm": (_L + "post_attention_layernorm.weight", None),
    "layers/w_gate": (_L + "mlp.gate_proj.weight", 1),
    "layers/w_up": (_L + "mlp.up_proj.weight", 1),
    "layers/w_down": (_L + "mlp.down_proj.weight", 1),
}
# Gemma 2's "sandwich" norms: its post_attention_layernorm normalises the attention OUTPUT, and the pre-MLP
# norm is pre_feedforward_layernorm.
_POST_NORM_TENSORS = {
    "layers/post_attn_norm": (_L + "post_attention_layernorm.weight", None),
    "layers/mlp_norm": (_L + "pre_feedforward_layernorm.weight", None),
    "layers/post_mlp_norm": (_L + "post_feedforward_layernorm.weight", None),
}


def hf_tensor_table(config: ModelConfig) -> dict[str, tuple[str, int | None]]:
    """``HF_TENSORS`` adjusted for ``config``'s family."""
    return {**HF_TENSORS, **_POST_NORM_TENSORS} if config.post_norms else HF_TENSORS


class CheckpointError(ValueError):
    """A checkpoint on disk does not match what its config.json describes."""


_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


def _check_entry(name: str, info: object, data_bytes: int) -> None:
    """Raises ValueError unless ``info`` is ``{dtype, shape, data_offsets}`` with offsets inside the data."""
    if not isinstance(info, dict):
        raise ValueError(f"tensor {name!r}: entry is not an object")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(info.get("dtype"), str):
        raise ValueError(f"tensor {name!r}: no dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_bytes
    ):
        raise ValueError(
            f"tensor {name!r}: data_offsets {offsets!r} outside the file's {data_bytes} data bytes"
        )


class SafetensorsReader:
    """Reads tensors from one ``.safetensors`` file with plain reads instead of a memory map, so the pages
    of tensors already placed on devices do not stay resident (halves the peak RSS of a load).

    Format: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``,
    then the raw bytes.
    """

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        try:
            size = os.fstat(self._file.fileno()).st_size
            (n,) = struct.unpack("<Q", self._file.read(8))
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise ValueError(f"header length {n} does not fit in the file's {size} bytes")
            header = json.loads(self._file.read(n))
            if not isinstance(header, dict):
                raise ValueError(f"header is a JSON {type(header).__name__}, not an object")
            header.pop("__metadata__", None)
            for name, info in header.items():
                _check_entry(name, info, size - 8 - n)
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            self._file.close()
            raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
        self._header, self._data_start = header, 8 + n

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        info = self._header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out = np.empty(info["shape"], _ST_DTYPES[info["dtype"]])
        if out.nbytes != end - start:
            raise CheckpointError(f"{self.path}: tensor {name!r} byte size does not match its shape")
        self._file.seek(self._data_start + start)
        self._file.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _hf_shape(shape: tuple[int, ...], n_in: int | None) -> tuple[int, ...]:
    """transformers' shape of one (per-layer) jrft tensor: ``[out, in]`` for linears."""
    if n_in is None:
        return shape
    if n_in == 0:
        return (math.prod(shape),)
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _to_jrft(arr: np.ndarray, shape: tuple[int, ...], n_in: int | None) -> np.ndarray:
    return arr.T.reshape(shape) if n_in else arr.reshape(shape)


def _to_hf(arr: np.ndarray, n_in: int | None) -> np.ndarray:
    if n_in is None:
        return arr
    if n_in == 0:
        return arr.reshape(-1)
    return np.ascontiguousarray(arr.reshape(math.prod(arr.shape[:n_in]), -1).T)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _tensor_names(table, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """(transformers name, transformers shape) of every tensor making up jrft parameter ``name``."""
    template, n_in = table[name]
    if "{i}" not in template:
        return [(template, _hf_shape(shape, n_in))]
    return [(template.format(i=i), _hf_shape(shape[1:], n_in)) for i in range(shape[0])]


# --- reading ------------------------------------------------------------------------------------


def _resolve_dir(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not path.strip():
        raise FileNotFoundError(
            "from_pretrained: no model given (model.path is empty): set model.path to a directory holding "
            "config.json or a hub model id"
        )
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"from_pretrained: {path} is not a directory holding config.json")
    # A hub id: let huggingface_hub download (or find in its cache) only the files jrft reads.
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
    try:
        return snapshot_download(path, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, gated model...
        raise FileNotFoundError(
            f"from_pretrained: {path} is neither a local directory nor a downloadable hub model ({e})"
        ) from e


def _read_index(directory: str, index: str) -> dict[str, str]:
    """The index's weight_map as tensor name -> shard path; every shard must lie inside ``directory``."""
    try:
        with open(index, "rb") as f:
            weight_map = json.loads(f.read()).get("weight_map")
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
    # Lexically, not through symlinks: the hub cache's snapshot files are symlinks into its blobs directory.
    root = os.path.abspath(directory)
    files = {}
    for name, file in weight_map.items():
        path = os.path.join(directory, file)
        if os.path.isabs(file) or os.path.commonpath([root, os.path.abspath(path)]) != root:
            raise CheckpointError(
                f"{index}: shard {file!r} of tensor {name!r} lies outside the model directory {root}"
            )
        if not os.path.isfile(path):
            raise CheckpointError(f"{index}: shard {file!r} of tensor {name!r} does not exist")
        files[name] = path
    return files


def _weight_files(directory: str) -> dict[str, str]:
    """transformers tensor name -> file path, from the index or the single safetensors file."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        return _read_index(directory, index)
    single = os.path.join(directory, SINGLE_FILE)
    if not os.path.isfile(single):
        raise FileNotFoundError(f"from_pretrained: {directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    with SafetensorsReader(single) as f:
        return dict.fromkeys(f.keys(), single)


def _check_tensors(expected: dict[str, tuple[int, ...]], files: dict[str, str], handles) -> None:
    """Raises a ``CheckpointError`` naming every missing or misshapen tensor (and its file)."""
    problems = []
    for name, shape in expected.items():
        if name not in files:
            where = sorted(set(files.values()))
            problems.append(f"missing tensor {name!r} (looked in {', '.join(where)})")
            continue
        handle = handles[files[name]]
        if name not in handle.keys():
            problems.append(f"{files[name]}: missing tensor {name!r} (listed in the index)")
            continue
        found = handle.shape(name)
        if found != shape:
            problems.append(f"{files[name]}: tensor {name!r} has shape {found}, expected {shape}")
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(
            "checkpoint does not match its config.json:\n  " + "\n  ".join(problems[:10]) + more
        )


def _sharding_for(var: nnx.Variable, mesh: Mesh | None, rules) -> jax.sharding.Sharding:
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    shape = var.get_value().shape
    return NamedSharding(
        mesh, logical_to_spec(logical_axes_of(var) or (None,) * len(shape), shape, mesh, rules)
    )


def _place(arr: np.ndarray, sharding) -> jax.Array:
    # Each device gets only its slice of the host array.
    return jax.make_array_from_callback(arr.shape, sharding, lambda index: arr[index])


def from_pretrained(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat: str = "none",
    scalar_head: bool = False,
    rules: Mapping[str, AxisRule] | None = None,
    seed: int = 0,
    lora: LoRASpec | None = None,
    lora_init: str | os.PathLike | None = None,
    base_quantization: str | None = None,
    reward_likelihood_coef: float | None = None,
) -> Decoder:
    """Loads a transformers checkpoint into a ``Decoder``.

    Args:
      path: a local directory with ``config.json`` and ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json``), or a hub id (downloaded through huggingface_hub's cache).
      mesh: place each parameter on its ``NamedSharding`` over this mesh (``jrft.parallel.make_mesh``);
        default: the first device.
      dtype: compute dtype; param_dtype: storage dtype of the parameters.
      remat: remat policy name (``jrft.models.layers.REMAT_POLICIES``).
      scalar_head: add a scalar head, read from ``score.weight`` if present, else freshly initialised
        (``seed``); a sequence-classification checkpoint without ``lm_head.weight`` then gets a fresh LM head.
      rules: overrides of the logical-axis rules table.
      lora: add fresh LoRA adapters (``jrft.models.lora.LoRASpec``; B = 0, so the model equals the
        checkpoint's; A from ``seed``).
      lora_init: a PEFT LoRA adapter directory whose ``adapter_model.safetensors`` gives the adapters' A and B
        instead (its rank and modules must be ``lora``'s; ``jrft.config.peft_adapter_settings`` reads them).
      base_quantization: ``"int8"`` (per output channel) or ``"nf4"`` (4-bit NormalFloat, blocks of 64
        inputs) quantizes the layers' projections as they are read (``jrft.models.quant``; for a frozen base
        under LoRA).
      reward_likelihood_coef: sets ``ModelConfig.reward_likelihood_coef`` (a reward model's score adds this x
        the completion's log-prob; None: the checkpoint's ``jrft_reward_likelihood_coef``, else 0).

    Raises:
      FileNotFoundError: no config.json / no safetensors. ValueError: unsupported model_type.
      CheckpointError: a tensor is missing or has the wrong shape (names the file and the tensor).
    """
    directory = _resolve_dir(path)
    config = ModelConfig.from_hf(directory)
    if reward_likelihood_coef is not None:
        config = config.replace(reward_likelihood_coef=float(reward_likelihood_coef))
    files = _weight_files(directory)
    abstract = nnx.eval_shape(
        lambda: Decoder(
            config,
            rngs=nnx.Rngs(seed),
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
            scalar_head=scalar_head,
            lora=lora,
            base_quantization=base_quantization,
        )
    )
    graphdef, state = nnx.split(abstract)
    flat = [(_path_str(p), v) for p, v in nnx.to_flat_state(state)]
    # Parameters a checkpoint may lack, initialised fresh instead: the scalar head of a reward/value model
    # started from a causal LM, and the LM head of a ...ForSequenceClassification checkpoint (which has none).
    fresh = set()
    if scalar_head and "score.weight" not in files:
        fresh.add("scalar_head/kernel")
    if scalar_head and not config.tie_embeddings and "lm_head.weight" not in files:
        if config.reward_likelihood_coef:
            raise CheckpointError(
                f"{directory}: reward_likelihood_coef={config.reward_likelihood_coef} scores with the LM "
                "head, but the checkpoint has no lm_head.weight (a ...ForSequenceClassification export of an "
                "untied model); train the reward model from a causal LM checkpoint"
            )
        fresh.add("lm_head")
    adapters = {name for name, _ in flat if name.startswith("lora/")}
    fresh |= adapters
    scales = {name for name, _ in flat if name.endswith("_scale")}  # quantized base: made with their weights
    fresh |= scales
    table = hf_tensor_table(config)
    specs = layer_param_specs(config)

    def read_shape(name: str, var) -> tuple[int, ...]:  # a quantized weight is read in its float shape
        quantized = f"{name}_scale" in scales
        return specs[name.removeprefix("layers/")].shape if quantized else var.get_value().shape

    expected = {
        hf_name: hf_shape
        for name, var in flat
        if name not in fresh
        for hf_name, hf_shape in _tensor_names(table, name, read_shape(name, var))
    }
    np_dtype = np.dtype(jnp.dtype(param_dtype))
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(SafetensorsReader(f)) for f in sorted(set(files.values()))}
        _check_tensors(expected, files, handles)
        if lora_init is not None:
            adapter_reader = stack.enter_context(SafetensorsReader(os.path.join(lora_init, PEFT_WEIGHTS)))
            read_adapter = _adapter_reader(adapter_reader, table, {n: v for n, v in flat if n in adapters})

        def _read(hf_name: str) -> np.ndarray:
            return handles[files[hf_name]].read(hf_name)

        values = {}
        for name, var in flat:
            shape = read_shape(name, var)
            if name in scales:
                continue
            if name in adapters and lora_init is not None:
                host = read_adapter(name).astype(np_dtype)
            elif name in adapters:
                host = lora_host_init(name, shape, lora, seed, np_dtype)
            elif name in fresh:
                key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))
                host = np.asarray(jax.random.normal(key, shape) / math.sqrt(shape[0])).astype(np_dtype)
            else:
                template, n_in = table[name]
                host = np.empty(shape, np_dtype)
                if "{i}" in template:  # stack the per-layer tensors
                    for i in range(shape[0]):
                        host[i] = _to_jrft(_read(template.format(i=i)), shape[1:], n_in)
                else:
                    host[...] = _to_jrft(_read(template), shape, n_in)
            if f"{name}_scale" in scales:
                quantize = FORMATS[base_quantization].quantize
                host, scale = quantize(host, QUANT_WEIGHTS[name.removeprefix("layers/")])
                scale_var = dict(flat)[f"{name}_scale"]
                values[f"{name}_scale"] = _place(scale, _sharding_for(scale_var, mesh, rules))
            values[name] = _place(host, _sharding_for(var, mesh, rules))
            del host
    for path_key, var in nnx.to_flat_state(state):
        var.set_value(values[_path_str(path_key)])
    return nnx.merge(graphdef, state)


def _peft_name(table, weight: str, layer: int, which: str) -> str:
    """PEFT's tensor name of layer ``layer``'s adapter ``which`` (``A`` or ``B``) of jrft weight ``weight``:
    ``base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight``."""
    template = table[f"layers/{weight}"][0].removesuffix(".weight")
    return f"base_model.model.{template.format(i=layer)}.lora_{which}.weight"


def _adapter_reader(reader: SafetensorsReader, table, variables: dict):
    """``name -> [L, in, r] / [L, r, out]`` host array of adapter variable ``name`` (``lora/wq_a``) from a
    PEFT adapter file, after checking that every layer's tensor is there with PEFT's shape (A ``[r, in]``,
    B ``[out, r]``). Names match from ``layers.<i>.`` on, so a prefix other than PEFT's usual one reads."""
    by_suffix = {k[k.index("layers.") :]: k for k in reader.keys() if "layers." in k}
    wanted, problems = {}, []
    for name, var in variables.items():
        weight, which = name.removeprefix("lora/").rsplit("_", 1)
        shape = var.get_value().shape  # [L, in, r] or [L, r, out]
        for i in range(shape[0]):
            peft = _peft_name(table, weight, i, which.upper())
            key = by_suffix.get(peft[peft.index("layers.") :])
            if key is None:
                problems.append(f"missing tensor {peft!r}")
            elif reader.shape(key) != shape[:0:-1]:
                problems.append(f"tensor {key!r} has shape {reader.shape(key)}, expected {shape[:0:-1]}")
            wanted[(name, i)] = key
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(
            f"{reader.path}: the adapter does not fit the model:\n  " + "\n  ".join(problems[:10]) + more
        )

    def read(name: str) -> np.ndarray:
        shape = variables[name].get_value().shape
        return np.stack([reader.read(wanted[(name, i)]).T for i in range(shape[0])])

    return read


_FINGERPRINT_SAMPLE = 1 << 20


def weights_fingerprint(path: str | os.PathLike) -> dict[str, int | str]:
    """A cheap identity of the checkpoint at ``path``: ``{"bytes": total size of its safetensors files,
    "sha256": hash of config.json, each weight file's name, size and header (tensor names, dtypes, shapes,
    offsets) and the first and last MiB of its data}``. Reads a few MiB whatever the model's size; a
    checkpoint with other weights of the same shapes differs in the sampled bytes (unless it differs only
    in the middle of every file)."""
    import hashlib

    directory = _resolve_dir(path)
    digest = hashlib.sha256()
    with open(os.path.join(directory, "config.json"), "rb") as f:
        digest.update(f.read())
    total = 0
    for file in sorted(set(_weight_files(directory).values())):
        size = os.path.getsize(file)
        total += size
        digest.update(f"{os.path.basename(file)}:{size}".encode())
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            digest.update(f.read(min(n, _MAX_HEADER_BYTES)))
            digest.update(f.read(_FINGERPRINT_SAMPLE))
            f.seek(max(8 + n, size - _FINGERPRINT_SAMPLE))
            digest.update(f.read(_FINGERPRINT_SAMPLE))
    return {"bytes": total, "sha256": digest.hexdigest()}


# --- writing ------------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """``"2GB"`` -> 2e9 bytes (decimal units, like transformers; ``KiB``/``MiB``/``GiB`` binary)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"max_shard_size: cannot parse {size!r} (e.g. '2GB', '500MB', 10_000_000)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _hf_tensors(model: Decoder, dtype) -> list[tuple[str, np.ndarray]]:
    """All of ``model``'s parameters as transformers tensors, in a stable order; LoRA adapters are merged
    into the weights they adapt (``W + scale * A B``), so the result is a plain transformers model."""
    out, table = [], hf_tensor_table(model.config)
    merged = merged_layer_arrays(model) if model.lora is not None or model.layers.quantized else {}
    base = nnx.All(nnx.Param, nnx.Not(LoRAParam))
    for path_key, var in nnx.to_flat_state(nnx.state(model, base)):
        name = _path_str(path_key)
        if name.endswith("_scale"):  # quantized base: merged holds the weights dequantized
            continue
        template, n_in = table[name]
        layer_name = name.removeprefix("layers/")
        value = merged[layer_name] if name.startswith("layers/") and layer_name in merged else var.get_value()
        host = host_array(value)  # multi-host: every process gathers the slices
        if dtype is not None:
            host = host.astype(np.dtype(jnp.dtype(dtype)))
        if "{i}" in template:
            out += [(template.format(i=i), _to_hf(host[i], n_in)) for i in range(host.shape[0])]
        else:
            out.append((template, _to_hf(host, n_in)))
    return sorted(out, key=lambda item: _natural_key(item[0]))


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _shards(tensors: list[tuple[str, np.ndarray]], limit: int) -> list[list[tuple[str, np.ndarray]]]:
    shards, current, size = [], [], 0
    for name, arr in tensors:
        if current and size + arr.nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, arr))
        size += arr.nbytes
    return shards + [current] if current else shards


def _write_weights(directory: str, tensors: list[tuple[str, np.ndarray]], limit: int) -> None:
    shards = _shards(tensors, limit)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(dict(shards[0]), os.path.join(directory, SINGLE_FILE), metadata=meta)
        return
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(dict(shard), os.path.join(directory, file), metadata=meta)
        weight_map.update(dict.fromkeys((name for name, _ in shard), file))
    index = {"metadata": {"total_size": sum(a.nbytes for _, a in tensors)}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)


ADAPTER_DIR = "adapter"


def peft_adapter_tensors(model: Decoder) -> tuple[dict, list[tuple[str, np.ndarray]]]:
    """``(adapter_config, tensors)`` of ``model``'s LoRA adapters in PEFT's format: per layer and projection
    ``base_model.model.<module>.lora_A.weight [r, in]`` and ``lora_B.weight [out, r]`` (PEFT computes
    ``W + lora_alpha / r * B A``; ``lora_alpha`` is written as ``scale * r``, so rsLoRA's scale is kept)."""
    from jrft.models.lora import MODULE_WEIGHTS

    spec, table = model.lora.spec, hf_tensor_table(model.config)
    tensors = []
    for module in spec.modules:
        w = MODULE_WEIGHTS[module]
        a = host_array(getattr(model.lora, f"{w}_a").get_value()).astype(np.float32)  # [L, in, r]
        b = host_array(getattr(model.lora, f"{w}_b").get_value()).astype(np.float32)  # [L, r, out]
        for i in range(a.shape[0]):
            tensors.append((_peft_name(table, w, i, "A"), np.ascontiguousarray(a[i].T)))
            tensors.append((_peft_name(table, w, i, "B"), np.ascontiguousarray(b[i].T)))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": spec.scale * spec.rank,
        "lora_dropout": spec.dropout,
        "target_modules": list(spec.modules),
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "base_model_name_or_path": None,
    }
    return config, sorted(tensors, key=lambda item: _natural_key(item[0]))


def save_pretrained(
    model: Decoder,
    path: str | os.PathLike,
    tokenizer=None,
    *,
    max_shard_size: int | str = "2GB",
    dtype=None,
) -> str:
    """Writes ``model`` (and ``tokenizer``) in transformers' format, atomically (temp dir, then rename).

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards of at most
    ``max_shard_size`` plus ``model.safetensors.index.json``) and the tokenizer's files.
    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads the result; a model with a scalar head
    is tagged ``...ForSequenceClassification`` (``num_labels=1``, head in ``score.weight``), which
    ``AutoModelForSequenceClassification`` loads. ``dtype`` casts the saved tensors (default: as stored).
    A model with LoRA adapters is saved merged (``W + scale * A B``), and its adapters alone in PEFT's format
    under ``path/adapter/`` (``adapter_config.json``, ``adapter_model.safetensors``, float32).
    Multi-host: call it on every process (parameters are gathered collectively); process 0 writes.
    Returns the path.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    cfg = model.config
    family = FAMILIES[cfg.family]
    tensors = _hf_tensors(model, dtype)
    adapter = peft_adapter_tensors(model) if model.lora is not None else None
    saved_dtype = str(tensors[0][1].dtype) if tensors else "float32"
    hf_config = cfg.to_hf(family.classifier if model.scalar_head is not None else None)
    hf_config["dtype"] = saved_dtype
    if model.scalar_head is not None:
        hf_config["num_labels"] = 1
    if jax.process_index() != 0:  # every process gathered (collective); one writes
        return path
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        _write_weights(tmp, tensors, parse_size(max_shard_size))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        gen = {
            k: hf_config[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if hf_config.get(k) is not None
        }
        if gen:
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(gen, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if adapter is not None:
            os.makedirs(os.path.join(tmp, ADAPTER_DIR))
            with open(os.path.join(tmp, ADAPTER_DIR, "adapter_config.json"), "w") as f:
                json.dump(adapter[0], f, indent=2)
            save_file(dict(adapter[1]), os.path.join(tmp, ADAPTER_DIR, "adapter_model.safetensors"))
        old = None
        if os.path.exists(path):
            old = os.path.join(parent, f".{os.path.basename(path)}.old-{uuid.uuid4().hex[:8]}")
            os.rename(path, old)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
