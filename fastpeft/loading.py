"""Streaming model loading: a transformers causal LM read tensor by tensor, linear weights quantized to NF4 on arrival.

``load_causal_lm(dir, quantize=True)`` builds the model on the meta device (no memory), then walks the
safetensors shards with ``safe_open``: each linear weight (not the LM head) is read, quantized to NF4 on
the target device and dropped, every other tensor is read and installed in place of its meta twin. The
full 16-bit model never exists; the peak is the quantized model plus one 16-bit tensor.

Checkpoints already quantized by bitsandbytes (transformers' ``load_in_4bit`` format: six keys per
linear, see ``fastpeft.quant``) load directly into ``NF4Linear`` layers. Tied parameters (an LM head
tied to the input embedding) are loaded once and shared. Missing, unexpected or mis-shaped tensors are
errors naming them; only safetensors files are read (never pickle).

A GGUF file (llama.cpp's format; needs the optional ``gguf`` package: ``pip install 'fastpeft[gguf]'``)
loads the same way: transformers reads its config and tokenizer, and the tensors are read from the
memory-mapped file one at a time, dequantized (Q4_0, Q8_0, F16, ...), renamed to transformers' names,
and installed or quantized to NF4 before the next one is read.

``save_quantized`` writes the NF4 checkpoint transformers + bitsandbytes load as ``load_in_4bit``;
``dequantize_model`` turns ``NF4Linear`` layers back into dense ``nn.Linear`` (to merge adapters onto).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastpeft.config_fields import check_config_fields
from fastpeft.gguf_file import is_gguf_file, read_gguf_info
from fastpeft.peft.quantize import is_skipped
from fastpeft.quant import NF4Weight, quantize_nf4

__all__ = [
    "bnb_quantization_config",
    "check_causal_lm",
    "dequantize_model",
    "is_gguf",
    "is_prequantized",
    "load_causal_lm",
    "load_config",
    "load_tokenizer",
    "require_transformers",
    "save_quantized",
    "weight_files",
]

_log = logging.getLogger(__name__)
_BLOB_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def require_transformers() -> Any:
    """Import ``transformers`` or raise a one-line ``ImportError`` saying how to get it."""
    try:
        import transformers
    except ImportError:
        raise ImportError("this command needs transformers: pip install 'fastpeft[dev]' (or transformers)") from None
    return transformers


def _names(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def is_gguf(model: str | os.PathLike) -> bool:
    """True when ``model`` names a GGUF file rather than a checkpoint directory: a ``*.gguf`` name, or a file of
    any name that starts with GGUF's magic bytes."""
    return str(model).lower().endswith(".gguf") or (os.path.isfile(model) and is_gguf_file(model))


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: pip install 'fastpeft[gguf]'") from None
    return gguf


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load_config(model_dir: str | os.PathLike) -> Any:
    """The model's config: ``config.json`` of a checkpoint directory, or the metadata of a GGUF file.

    A GGUF file's layout is checked first (``fastpeft.gguf_file``), and the size fields of either kind are checked
    before transformers builds its config (``fastpeft.config_fields``).

    Raises:
        FileNotFoundError: the directory, its ``config.json`` or the GGUF file is missing.
        ValueError: the config is unreadable, names an architecture transformers does not know, or has a size
            field that is not a positive int or does not fit the others (each named); a GGUF file is truncated
            or corrupt (named); a file that is neither a directory nor a GGUF file.
        ImportError: a GGUF file without the ``gguf`` package.
    """
    transformers = require_transformers()
    model_dir = Path(model_dir)
    if is_gguf(model_dir):
        return _gguf_config(transformers, model_dir)
    if model_dir.is_file():
        raise ValueError(f"{model_dir}: a file that is not GGUF (no GGUF magic bytes); --model takes a checkpoint "
                         "directory or a GGUF file")  # fmt: skip
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a transformers checkpoint)")
    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deep
        raise ValueError(f"{path}: unreadable config ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if not isinstance(raw.get("quantization_config", {}), dict):
        # transformers fails on it with an AttributeError deep inside
        raise ValueError(f"{path}: quantization_config must be an object, got {raw['quantization_config']!r:.80}")
    check_config_fields(str(path), raw)
    try:
        return transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (ValueError, KeyError, OSError, AttributeError, TypeError) as e:
        raise ValueError(f"{path}: unsupported or unreadable config ({_first_line(e)})") from None
    except Exception as e:  # huggingface_hub's StrictDataclassError: a config class's own validation
        if not type(e).__module__.startswith("huggingface_hub"):
            raise
        raise ValueError(f"{path}: {_last_line(e)}") from None


def _last_line(e: BaseException) -> str:
    """The innermost message of a validation error that wraps another (``validator 'x':`` then ``ValueError: why``)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1].removeprefix("ValueError: ").removeprefix("TypeError: ") if lines else type(e).__name__


def _gguf_config(transformers: Any, path: Path) -> Any:
    """``load_config`` of a GGUF file: its layout checked, then transformers' config from its metadata."""
    _require_gguf()
    info = read_gguf_info(path)
    try:
        config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except (ValueError, KeyError, OSError, TypeError, NotImplementedError) as e:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        if info.architecture not in GGUF_SUPPORTED_ARCHITECTURES:  # transformers says "not a valid JSON file"
            raise ValueError(
                f"{path}: GGUF architecture {info.architecture!r} is not one transformers reads "
                f"({', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))})"
            ) from None
        raise ValueError(f"{path}: unsupported or unreadable GGUF file ({_first_line(e)})") from None
    check_config_fields(str(path), config.to_dict())
    config._name_or_path = str(path)
    return config


def load_tokenizer(model_dir: str | os.PathLike) -> Any:
    """The tokenizer of a checkpoint directory, or the one a GGUF file embeds (as transformers converts it).

    Raises:
        ValueError: no usable tokenizer.
    """
    transformers = require_transformers()
    model_dir = Path(model_dir)
    where = {"gguf_file": model_dir.name} if is_gguf(model_dir) else {}
    src = model_dir.parent if where else model_dir
    try:
        return transformers.AutoTokenizer.from_pretrained(str(src), local_files_only=True, **where)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{model_dir}: no usable tokenizer ({_first_line(e)})") from None


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors shards of a checkpoint: those its index names, else every ``*.safetensors``.

    Raises:
        FileNotFoundError: no safetensors file, or a shard the index names is missing.
        ValueError: the index is unreadable.
    """
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: unreadable shard index ({type(e).__name__}: {e})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{model_dir}: shard(s) named in {index.name} are missing: {_names(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" ({_names(pickled)} present: pickle checkpoints are never loaded)" if pickled else ""
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights{hint}")
    return files


def is_prequantized(config: Any) -> bool:
    """True when the config says the checkpoint holds bitsandbytes 4-bit NF4 weights.

    Raises:
        ValueError: the checkpoint is quantized some other way (8-bit, FP4, GPTQ, ...).
    """
    q = getattr(config, "quantization_config", None)
    if q is None:
        return False
    if not isinstance(q, dict):
        if not callable(getattr(q, "to_dict", None)):
            where = getattr(config, "_name_or_path", None) or "the model config"
            where = Path(where) / "config.json" if Path(where).is_dir() else where
            raise ValueError(f"{where}: quantization_config must be an object, got {q!r:.80}")
        q = q.to_dict()
    if q.get("quant_method") == "bitsandbytes" and q.get("load_in_4bit") and q.get("bnb_4bit_quant_type") == "nf4":
        return True
    raise ValueError(f"unsupported quantization_config {json.dumps(q, sort_keys=True)[:200]} (only bitsandbytes NF4)")


def _install(model: nn.Module, key: str, value: torch.Tensor, requires_grad: bool) -> None:
    mod_name, _, attr = key.rpartition(".")
    module = model.get_submodule(mod_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=requires_grad and value.is_floating_point())
    else:
        module._buffers[attr] = value


def _build_on_meta(model_dir: Path, config: Any) -> nn.Module:
    transformers = require_transformers()
    if hasattr(config, "quantization_config"):
        # The layers are swapped here, not by transformers' quantizer: build the plain architecture.
        config = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    try:
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, ImportError) as e:
        kind = getattr(config, "model_type", "?")
        raise ValueError(f"{model_dir}: cannot build a causal LM for model_type {kind!r} ({_first_line(e)})") from None


class _Safetensors:
    """The tensors of safetensors shards: names and shapes from the headers, each tensor read on demand."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import SafetensorError, safe_open

        self.files = files
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        self.where[k] = f
                        self.shapes[k] = tuple(sf.get_slice(k).get_shape())
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{f}: unreadable safetensors file ({e})") from None

    def label(self, key: str) -> str:
        return self.where[key].name

    def read(self, device: torch.device) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
        from safetensors import safe_open

        for f in self.files:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                for key in sf.keys():
                    yield key, lambda sf=sf, key=key: sf.get_tensor(key)


class _GGUF:
    """The tensors of a GGUF file under transformers' names: the file is memory-mapped, and each tensor is
    dequantized (and un-permuted, e.g. Llama's q/k rows) only when read, through transformers' GGUF mapping."""

    def __init__(self, path: Path, model: nn.Module, config: Any) -> None:
        gguf = _require_gguf()
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        self.path, self.dequantize = path, gguf.dequantize
        try:
            reader = gguf.GGUFReader(str(path))
            arch = str(bytes(reader.fields["general.architecture"].parts[-1]), encoding="utf-8")
        except (ValueError, KeyError, OSError, struct.error) as e:
            raise ValueError(f"{path}: unreadable GGUF file ({_first_line(e)})") from None
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
        try:
            self.mapping = get_gguf_hf_weights_map(model, self.processor)
        except NotImplementedError as e:
            raise ValueError(
                f"{path}: GGUF architecture {arch!r} has no tensor-name mapping ({_first_line(e)})"
            ) from None
        self.tensors = {self.mapping[t.name]: t for t in reader.tensors if t.name in self.mapping}
        # GGUF lists dimensions fastest-varying first (ggml's ne): torch's shape is the reverse.
        self.shapes = {k: tuple(int(d) for d in reversed(t.shape)) for k, t in self.tensors.items()}

    def label(self, key: str) -> str:
        return f"{self.path.name} ({self.tensors[key].name})"

    def _get(self, key: str, device: torch.device) -> torch.Tensor:
        import numpy as np

        t = self.tensors[key]
        weights = self.dequantize(t.data, t.tensor_type)
        weights = self.processor.process(weights=weights, name=t.name, tensor_key_mapping=self.mapping,
                                         parsed_parameters={"tensors": {}}).weights  # fmt: skip
        # A copy: unquantized tensors come back as read-only views of the mapped file.
        return torch.from_numpy(np.array(weights, copy=True)).reshape(self.shapes[key]).to(device)

    def read(self, device: torch.device) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
        for key in self.tensors:
            yield key, lambda key=key: self._get(key, device)


def _source(model_dir: Path, model: nn.Module, config: Any) -> _Safetensors | _GGUF:
    return _GGUF(model_dir, model, config) if is_gguf(model_dir) else _Safetensors(weight_files(model_dir))


def check_causal_lm(model_dir: str | os.PathLike) -> None:
    """Fail early, with ``load_causal_lm``'s errors, if ``model_dir`` cannot load (config, weights, architecture).

    Reads only the config and the shard names, and builds the model on the meta device (no memory).
    """
    config = load_config(model_dir)
    is_prequantized(config)
    model = _build_on_meta(Path(model_dir), config)
    if is_gguf(model_dir):
        _GGUF(Path(model_dir), model, config)
    else:
        weight_files(model_dir)


def load_causal_lm(
    model_dir: str | os.PathLike,
    quantize: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    skip: Iterable[str] = ("lm_head",),
    double_quant: bool = True,
) -> nn.Module:
    """Load a transformers causal LM from a local safetensors checkpoint, streaming (see module doc).

    Args:
        model_dir: a directory with ``config.json`` and safetensors weights (one file, or shards with or
            without ``model.safetensors.index.json``), or a ``*.gguf`` file.
        quantize: quantize every ``nn.Linear`` not matched by ``skip`` to NF4 while reading.
        device: where the model's tensors go (quantization runs there too).
        dtype: dtype of the floating tensors kept dense; default the checkpoint's (``config.dtype``).
        skip: module names (exact, ``.suffix`` or a parent path) kept dense.
        double_quant: QLoRA double quantization of the absmax statistics.

    Returns:
        the model in eval mode; pre-quantized checkpoints always come back with ``NF4Linear`` layers.

    Raises:
        FileNotFoundError: the directory, its config or its weights are missing.
        ValueError: unsupported architecture or quantization, unreadable shard, missing / unexpected /
            mis-shaped tensors (named); ``quantize`` with no linear layer to quantize.

    A checkpoint whose tensors or buffers transformers converts on load (renamed keys such as GPT-NeoX's
    ``embed_out``, Mixtral's per-expert weights fused into one tensor, buffers computed by a module's
    ``__init__`` such as Gemma's ``embed_scale`` or BERT's ``position_ids``) cannot be streamed: it is loaded
    by transformers' ``from_pretrained`` instead, with one logged line saying so, and held to the same rule
    (no missing, unexpected or mis-shaped tensor); then quantized layer by layer.
        ImportError: a GGUF file without the ``gguf`` package.
    """
    from fastpeft.nn import NF4Linear

    model_dir, device, skip = Path(model_dir), torch.device(device), tuple(skip)
    config = load_config(model_dir)
    prequantized = is_prequantized(config)
    if dtype is None:
        # read from the instance: transformers >= 4.56 warns on every `config.torch_dtype`, older ones lack `dtype`
        dtype = vars(config).get("dtype") or vars(config).get("torch_dtype") or torch.float32
        dtype = _DTYPES.get(dtype, torch.float32) if isinstance(dtype, str) else dtype
    try:
        model = _stream(model_dir, config, prequantized, quantize, device, dtype, skip, double_quant)
    except _CannotStream as e:
        if is_gguf(model_dir) or prequantized:
            raise ValueError(str(e)) from None
        _log.warning(
            "%s cannot be read tensor by tensor (%s): loading it with transformers' from_pretrained instead, "
            "the whole %s model in memory before quantization",
            model_dir, e.reason, type(e.model).__name__,
        )  # fmt: skip
        model = _from_pretrained(model_dir, e, quantize, device, dtype, skip, double_quant)
    if quantize and not any(isinstance(m, NF4Linear) for m in model.modules()):
        raise ValueError(
            f"{model_dir}: quantize=True (QLoRA) found no linear layer to quantize in the {type(model).__name__} "
            f"model (skipped: {', '.join(skip) or 'none'}); train it with LoRA instead"
        )
    return model


class _CannotStream(ValueError):
    """The checkpoint's tensors or the model's buffers do not map one to one onto the model built on meta
    (transformers converts them on load: renamed keys, fused experts, buffers computed by ``__init__``)."""

    def __init__(self, message: str, reason: str, model: nn.Module) -> None:
        super().__init__(message)
        self.reason, self.model = reason, model


def _from_pretrained(
    model_dir: Path,
    error: _CannotStream,
    quantize: bool,
    device: torch.device,
    dtype: torch.dtype,
    skip: tuple[str, ...],
    double_quant: bool,
) -> nn.Module:
    """transformers' own loader, held to the streaming loader's rule: every tensor present, none left over."""
    from fastpeft.peft.quantize import quantize_model

    tf = require_transformers()
    model, info = tf.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"{error} (transformers' loader reports {_names([f'{k}: {v}' for k, v in bad.items()])})")
    model.to(device)
    if quantize:
        quantize_model(model, skip=skip, double_quant=double_quant)
    model.config._name_or_path = str(model_dir.resolve())  # an adapter naming it then resolves from anywhere
    return model.eval()


def _stream(
    model_dir: Path,
    config: Any,
    prequantized: bool,
    quantize: bool,
    device: torch.device,
    dtype: torch.dtype,
    skip: tuple[str, ...],
    double_quant: bool,
) -> nn.Module:
    from fastpeft.nn import NF4Linear
    from fastpeft.peft.lora import conv1d_class

    model = _build_on_meta(model_dir, config)
    source = _source(model_dir, model, config)

    meta = model.state_dict(keep_vars=True)
    # Tied parameters share one meta tensor: group their names, load one, point the rest at it.
    groups: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        groups[id(p)].append(name)
    alias_of = {n: names[0] for names in groups.values() if len(names) > 1 for n in names}
    tied = set(alias_of)
    conv1d = conv1d_class()
    kinds = (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)
    linears = {n for n, m in model.named_modules() if isinstance(m, kinds)}
    transposed = {n for n, m in model.named_modules() if conv1d is not None and isinstance(m, conv1d)}
    targets = {n for n in linears if quantize and not is_skipped(n, skip) and f"{n}.weight" not in tied}

    key_shape = source.shapes
    prequant = {k[: -len(_BLOB_SUFFIX)] for k in key_shape if k.endswith(_BLOB_SUFFIX)}
    if prequant and not prequantized:
        raise ValueError(f"{model_dir}: 4-bit tensors present but config.json has no bitsandbytes quantization_config")
    unknown = prequant - linears
    if unknown:
        raise ValueError(f"{model_dir}: 4-bit tensors for modules that are not linear layers: {_names(unknown)}")
    targets -= prequant

    def owner(key: str) -> str | None:
        """The pre-quantized linear a key belongs to (``P.weight``, ``P.weight.<field>``, ``P.bias``)."""
        for depth in (1, 2, 3):
            cand = key.rsplit(".", depth)[0]
            rest = key[len(cand) + 1 :]
            if cand in prequant and (rest == "bias" or rest.split(".")[0] == "weight"):
                return cand
        return None

    # -- check names and shapes from the headers first: a bad checkpoint fails before any tensor is read --
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    owned = {k: owner(k) for k in key_shape} if prequant else {}
    unexpected = [
        k for k in key_shape if k not in meta and owned.get(k) is None and not any(p.search(k) for p in ignore)
    ]
    if unexpected:
        name = type(model).__name__
        raise _CannotStream(
            f"{model_dir}: unexpected tensors not in the {name} model: {_names(unexpected)}",
            f"tensors named {_names(unexpected, 2)} are not the model's", model,
        )  # fmt: skip
    present = {alias_of.get(k, k) for k in key_shape if k in meta}
    missing = [k for k in meta if alias_of.get(k, k) not in present and k.rpartition(".")[0] not in prequant]
    if missing:
        raise ValueError(f"{model_dir}: tensors missing from the checkpoint: {_names(missing)}")
    for k, shape in key_shape.items():
        if k in meta and owned.get(k) is None and shape != tuple(meta[k].shape):
            raise ValueError(
                f"{source.label(k)}: size mismatch for {k}: the checkpoint holds {shape}, "
                f"the model expects {tuple(meta[k].shape)}"
            )

    try:  # computed by the modules' __init__, not read: know before reading that they can be rebuilt
        _materialize_buffers(model, device)
    except ValueError as e:
        raise _CannotStream(f"{model_dir}: {e}", str(e), model) from None

    nf4: dict[str, NF4Weight] = {}
    bias: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    loaded: dict[str, str] = {}  # the first name of each parameter -> the key it was read from
    for key, get in source.read(device):
        mod, _, attr = key.rpartition(".")
        if owned.get(key) is not None:
            pending[owned[key]][key] = get()
            continue
        if key not in meta or alias_of.get(key, key) in loaded:
            continue  # an ignored key, or the other name of a tied parameter already read
        t = get()
        if t.is_floating_point():
            t = t.to(dtype)
        if mod in targets and attr == "weight":
            if mod in transposed:  # GPT-2's Conv1D stores [in, out]: quantize W as a Linear holds it
                t = t.t().contiguous()
            try:
                nf4[mod] = quantize_nf4(t, double_quant=double_quant)
            except ValueError as e:  # non-finite weights: say which file and tensor
                raise ValueError(f"{source.label(key)}: {key}: {e}") from None
            del t  # the 16-bit weight dies here: only its NF4 form stays
        elif mod in targets and attr == "bias":
            bias[mod] = t
        else:
            _install(model, key, t, requires_grad=bool(getattr(meta[key], "requires_grad", False)))
        loaded[alias_of.get(key, key)] = key
    for prefix, sd in pending.items():
        nf4[prefix] = NF4Weight.from_bnb_state_dict(sd, prefix)
        if f"{prefix}.bias" in sd:
            bias[prefix] = sd[f"{prefix}.bias"].to(dtype)

    for prefix, w in nf4.items():
        parent_name, _, child = prefix.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Linear(w, bias.get(prefix)))
    for names in groups.values():
        if len(names) > 1:
            src = model.get_parameter(loaded[names[0]])
            for n in names:
                mod_name, _, attr = n.rpartition(".")
                model.get_submodule(mod_name)._parameters[attr] = src
    model.config._name_or_path = str(model_dir.resolve())  # an adapter naming it then resolves from anywhere
    return model.eval()


def _materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary frequencies, ...) are not in checkpoints: rebuild them on ``device``.

    The module is constructed again from its config on the CPU (what its ``__init__`` computes is the
    buffer's value) and the buffers copied over; modules that cannot be rebuilt that way are an error.
    """
    for mod_name, module in list(model.named_modules()):
        metas = [k for k, b in module._buffers.items() if b is not None and b.is_meta]
        if not metas:
            continue
        where = f"{mod_name or 'the model'} ({type(module).__name__})"
        if any(True for _ in module.parameters(recurse=False)) or not hasattr(module, "config"):
            raise ValueError(f"cannot rebuild buffer(s) {metas} of {where}")
        try:
            with torch.device("cpu"):
                fresh = type(module)(config=module.config)
        except TypeError as e:
            raise ValueError(f"cannot rebuild buffer(s) {metas} of {where}: {e}") from None
        for k in metas:
            value = fresh._buffers.get(k)
            if value is None or value.shape != module._buffers[k].shape:
                raise ValueError(f"cannot rebuild buffer {k!r} of {where}")
            module._buffers[k] = value.to(device)


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every ``NF4Linear`` by an ``nn.Linear`` holding ``dequant(W)`` in ``dtype`` (in place)."""
    from fastpeft.nn import NF4Linear

    for name, module in list(model.named_modules()):
        if not isinstance(module, NF4Linear):
            continue
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        dense.weight = nn.Parameter(module.dequantize(dtype), requires_grad=False)
        if module.bias is not None:
            dense.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
    return model


def bnb_quantization_config(compute_dtype: torch.dtype, skip: Iterable[str] = ("lm_head",)) -> dict[str, Any]:
    """The ``quantization_config`` transformers writes for 4-bit NF4 with double quantization (bitsandbytes)."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": list(skip),
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, compute_dtype: torch.dtype = torch.bfloat16,
                   skip: Iterable[str] = ("lm_head",)) -> None:  # fmt: skip
    """Write ``model`` (with ``NF4Linear`` layers) as a transformers bitsandbytes-4-bit checkpoint into ``out_dir``.

    Files: ``config.json`` (with ``quantization_config``), ``generation_config.json`` when the model has
    one, and ``model.safetensors`` (six keys per quantized linear, tied parameters stored once). The tensors
    kept dense (embeddings, norms, the head, biases) are written in ``compute_dtype`` when they are 16-bit
    or wider floats, as a transformers + bitsandbytes 4-bit load holds them; the NF4 statistics stay float32.
    """
    from safetensors.torch import save_file

    from fastpeft.nn import NF4Linear

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    aliases = {name for name, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != name}
    nf4_weights = tuple(f"{n}.weight" for n, m in model.named_modules() if isinstance(m, NF4Linear))

    def stored(key: str, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu")
        if t.is_floating_point() and not key.startswith(nf4_weights) and t.element_size() >= 2:
            t = t.to(compute_dtype)
        return t.contiguous().clone()

    # Tied parameters are stored once (transformers re-ties them on load); everything else, even
    # tensors shared between layers (the NF4 code maps), is stored under each key.
    tensors = {k: stored(k, t) for k, t in model.state_dict().items() if k not in aliases}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["dtype"] = str(compute_dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)  # the deprecated spelling of dtype
    config["quantization_config"] = bnb_quantization_config(compute_dtype, skip)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out_dir))
