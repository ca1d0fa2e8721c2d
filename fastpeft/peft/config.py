"""Adapter configs with HF PEFT's field names, defaults and meaning, for the subset fastpeft supports.

Every config is a ``@dataclass``. ``to_dict()`` gives what ``adapter_config.json`` holds (``peft_type``
included); ``config_from_dict()`` is its inverse and refuses what it does not understand: an option
HF PEFT has but fastpeft does not implement raises ``ValueError`` naming it whenever it is set to a
non-default value. A key neither knows (a file from a newer PEFT release) is ignored with a warning naming
it, as HF PEFT does. Keys HF PEFT writes for its own bookkeeping
(``peft_version``, ``auto_mapping``, and the many method options it serializes at their defaults)
are accepted only at those defaults.

Configs also carry HF PEFT's own methods: ``save_pretrained(dir)`` writes ``adapter_config.json``,
``Config.from_pretrained(dir)`` / ``from_json_file(path)`` read one back (local directories only: fastpeft
never downloads), and every config records ``peft_version``, the HF PEFT file format it follows.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fastpeft.files import current_umask
from fastpeft.nn.checks import check_scale_value, is_finite_number
from fastpeft.peft.config_checks import _check_init, _check_megatron, _check_token_indices, _listed, check_module_path

__all__ = [
    "PEFT_FORMAT_VERSION",
    "AdapterConfig",
    "LoraConfig",
    "PeftConfigBase",
    "PeftType",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "TaskType",
    "config_from_dict",
]

# The HF PEFT release whose adapter files fastpeft reads and writes; saved as ``peft_version``
# ("<version>@fastpeft", HF PEFT's own spelling of a version plus where it came from).
PEFT_FORMAT_VERSION = "0.21.2"


class TaskType(str, enum.Enum):
    """HF PEFT's task types (a ``str`` enum: ``TaskType.CAUSAL_LM == "CAUSAL_LM"``)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """The adapter kinds fastpeft builds, with HF PEFT's names (``BOTTLENECK_ADAPTER`` is fastpeft's own)."""

    LORA = "LORA"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    BOTTLENECK_ADAPTER = "BOTTLENECK_ADAPTER"


_TASK_TYPES = {None, *(t.value for t in TaskType)}

# HF PEFT writes these into adapter_config.json; reading one at this value is harmless, any other
# value means a feature we do not implement.
_HF_BOOKKEEPING: dict[str, Any] = {
    "runtime_config": Any,  # HF PEFT drops it on reading too: it is only valid at runtime
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "kasa_config": None,
    "lora_ga_config": None,
    "megatron_core": "megatron.core",
    "monteclora_config": None,
    "qalora_group_size": 16,
    "use_bdlora": None,
    "velora_config": None,
    "tokenizer_kwargs": None,
    "loftq_config": {},
}


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be true or false, got {value!r}")


def _check_count(owner: str, name: str, value: Any, optional: bool = True) -> None:
    """``value`` must be a positive int (or None when ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def _check_names(owner: str, name: str, value: Any, regex: bool, entries: str = "path") -> None:
    """A list of module names, or (``regex``) a str compiled as a regular expression; None passes.

    ``entries``: what each list entry is, ``"path"`` (a module path matched exactly or as a ``.suffix``, HF
    PEFT's rule for lists: ``check_module_path``) or ``"regex"`` (compiled, as ``layers_pattern``'s are).
    """
    if value is None:
        return
    if isinstance(value, str):
        if not regex:
            return
        _compile(owner, name, value)
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{owner}: {name} must be a str or a list of str, got {value!r}")
    for v in value:
        if entries == "regex":
            _compile(owner, f"{name} entry", v)
        else:
            check_module_path(owner, name, v)


def _compile(owner: str, name: str, value: str) -> None:
    try:
        re.compile(value)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"{owner}: {name}={value!r} is not a valid regular expression ({e})") from None


def _is_default(value: Any, default: Any) -> bool:
    """``value`` means "not used": equal to ``default``, or any of None / [] / {} where the default is one."""
    empty = (None, [], {})
    return value == default or (any(value == e for e in empty) and any(default == e for e in empty))


@dataclass
class PeftConfigBase:
    """Fields every adapter config shares (HF PEFT's ``PeftConfig``)."""

    PEFT_TYPE: ClassVar[str] = ""
    # Options HF PEFT has that fastpeft does not implement, with their defaults.
    _unsupported: ClassVar[dict[str, Any]] = {}

    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    # Accepted as HF PEFT accepts them; peft_type is always the class's own (HF PEFT overrides it too).
    peft_type: str | None = None
    auto_mapping: dict | None = None
    peft_version: str | None = None

    def __post_init__(self) -> None:
        _check_bool(type(self).__name__, "inference_mode", self.inference_mode)
        if isinstance(self.task_type, enum.Enum) or self.task_type is not None and not isinstance(self.task_type, str):
            self.task_type = str(getattr(self.task_type, "value", self.task_type))
        if self.task_type not in _TASK_TYPES:
            raise ValueError(
                f"Invalid task type: '{self.task_type}'. Must be one of the following task types: "
                f"{', '.join(t.value for t in TaskType)}."
            )
        self.peft_type = PeftType(self.PEFT_TYPE)
        if self.peft_version is None:
            self.peft_version = f"{PEFT_FORMAT_VERSION}@fastpeft"
        elif not isinstance(self.peft_version, str):
            raise TypeError(f"{type(self).__name__}: peft_version must be a str, got {self.peft_version!r}")
        for name, default in self._unsupported.items():
            value = getattr(self, name)
            if not _is_default(value, default):
                raise ValueError(
                    f"{type(self).__name__}: option {name}={value!r} is not supported by fastpeft "
                    f"(only the default {default!r})"
                )

    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        """HF PEFT's flag for its adaption-prompt method, which fastpeft does not have."""
        return False

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict written to ``adapter_config.json`` (``peft_type`` included)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (created if needed), atomically.

        Args:
            save_directory: a directory (not a file).
            kwargs: ``auto_mapping_dict`` is recorded as ``auto_mapping`` (HF PEFT's custom-model note);
                other hub-upload arguments HF PEFT forwards are accepted and unused.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory}: should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        data = self.to_dict()
        if kwargs.get("auto_mapping_dict") is not None:
            data["auto_mapping"] = kwargs["auto_mapping_dict"]
        target = os.path.join(save_directory, CONFIG_FILE)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=save_directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it owner-only
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """The dict an ``adapter_config.json`` holds (HF PEFT's method: a dict, not a config)."""
        try:
            with open(path_json_file, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path_json_file}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path_json_file}: expected a JSON object, got {type(data).__name__}")
        data.pop("runtime_config", None)
        return data

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> PeftConfigBase:
        """The config saved in a local directory (``<dir>/<subfolder>/adapter_config.json``).

        As in HF PEFT, the class built is the one ``peft_type`` names. Hub arguments (``revision``,
        ``cache_dir``, ``token``, ...) are accepted; fastpeft reads local directories only.

        Raises:
            FileNotFoundError: no ``adapter_config.json`` there.
            ValueError: the file is not a config fastpeft can build (see ``config_from_dict``).
        """
        path = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        config_file = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(config_file):
            raise FileNotFoundError(
                f"{config_file}: no adapter config there (fastpeft loads local directories, it never downloads)"
            )
        config = config_from_dict(cls.from_json_file(config_file), config_file)
        if cls is not PeftConfigBase and not isinstance(config, cls):
            raise ValueError(f"{config_file}: holds a {type(config).__name__}, not a {cls.__name__}")
        return config


CONFIG_FILE = "adapter_config.json"


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is not None and not isinstance(value, (str, int, float, bool, list)):
        # A tokenizer object given as tokenizer_name_or_path: record where it came from, if it knows.
        return getattr(value, "name_or_path", None) or None
    return value


@dataclass
class LoraConfig(PeftConfigBase):
    """LoRA (and QLoRA when the base is NF4): ``y = base(x) + (alpha / r) * B(A(dropout(x)))``.

    Args:
        r: rank of ``A [r, in]`` and ``B [out, r]``.
        target_modules: list (exact module name or ``.suffix`` match), str (regex fullmatch on the
            module path) or ``"all-linear"`` (every linear layer but the output head); ``None`` picks
            HF PEFT's default for the architecture.
        exclude_modules: same matching rules; matched modules are never wrapped.
        lora_alpha: numerator of the scaling.
        lora_dropout: dropout on the LoRA input.
        bias: ``"none"``, ``"all"`` (every bias trains and is saved) or ``"lora_only"`` (biases of
            wrapped layers).
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        modules_to_save: modules trained in full (a trainable copy per adapter).
        init_lora_weights: ``True`` (Kaiming A, zero B), ``"gaussian"``, ``False`` (random B too), or one
            that starts from the base weight and moves part of it into the adapter: ``"pissa"`` (top ``r``
            singular directions), ``"pissa_niter_K"`` (the same by a randomized SVD of ``K`` iterations),
            ``"olora"`` (QR), ``"orthogonal"`` (A and B from orthogonal halves, ``B·A = 0``).
        fan_in_fan_out: ``True`` when the targets store ``[in, out]`` weights (GPT-2's ``Conv1D``);
            fastpeft detects ``Conv1D`` by type and sets this like HF PEFT does.
        rank_pattern / alpha_pattern: ``{pattern: r}`` / ``{pattern: alpha}`` overriding ``r`` / ``lora_alpha``
            for the modules whose path ends with ``pattern`` (a regex; HF PEFT's rule, first match wins).
        lora_bias: give ``lora_B`` a (zero-initialized, trained, saved) bias.
        trainable_token_indices: train only these rows of the input embedding (a list), or of the named
            embeddings (``{"embed_tokens": [0, 5]}``), stored as a delta beside the frozen table.
        target_parameters: LoRA on ``nn.Parameter`` weights by path (``"experts.gate_up_proj"``), for
            modules that hold weights outside an ``nn.Linear``; ``[..., out, in]`` as ``F.linear`` reads them.
        use_dora: DoRA (weight-decomposed LoRA): a trained magnitude per output row of each linear target
            (dense or NF4: QDoRA), per embedding dimension of an embedding and per output channel of a
            convolution, ``lora_magnitude_vector`` as HF PEFT; other target kinds are refused.
        megatron_config: accepted as None only (fastpeft has no Megatron parallel layers).
    """

    PEFT_TYPE: ClassVar[str] = "LORA"
    _unsupported: ClassVar[dict[str, Any]] = {"layer_replication": None, "use_qalora": False, "megatron_config": None}

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    use_dora: bool = False
    lora_bias: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict | None = None
    layer_replication: list | None = None
    use_qalora: bool = False
    megatron_config: dict | None = None

    def __post_init__(self) -> None:
        _check_megatron(self.use_dora, self.megatron_config)  # before super(): HF PEFT's DoRA message first
        super().__post_init__()
        _check_count("LoraConfig", "r", self.r, optional=False)
        check_scale_value("LoraConfig: ", "lora_alpha", self.lora_alpha)
        if not is_finite_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig: lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        for name in ("fan_in_fan_out", "use_rslora"):
            _check_bool("LoraConfig", name, getattr(self, name))
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig: bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        _check_init(self.init_lora_weights)
        _check_bool("LoraConfig", "lora_bias", self.lora_bias)
        _check_bool("LoraConfig", "use_dora", self.use_dora)
        if self.use_dora and self.lora_bias:
            raise ValueError("LoraConfig: The argument lora_bias=True is not supported for DoRA, please pass "
                             "use_dora=False")  # fmt: skip
        if self.lora_bias and self.init_lora_weights not in (True, False):
            # The weight-based inits and "gaussian" define A and B only (HF PEFT refuses the pair too).
            raise ValueError(
                f"LoraConfig: The argument lora_bias=True is not supported with "
                f"init_lora_weights={self.init_lora_weights!r}"
            )
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, {})
                continue
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise TypeError(f"LoraConfig: {name} must be a dict of module-name patterns, got {value!r}")
            for key, v in value.items():
                _check_names("LoraConfig", f"{name} key", key, regex=True)
                if name == "rank_pattern":
                    _check_count("LoraConfig", f"rank_pattern[{key!r}]", v, optional=False)
                else:
                    try:
                        check_scale_value("LoraConfig: ", f"alpha_pattern[{key!r}]", v)
                    except TypeError as e:
                        raise ValueError(str(e)) from None
        self.trainable_token_indices = _check_token_indices(self.trainable_token_indices)
        if isinstance(self.target_parameters, (tuple, set)):
            self.target_parameters = sorted(self.target_parameters)
        if self.target_parameters is not None and (
            not isinstance(self.target_parameters, list) or not all(isinstance(t, str) for t in self.target_parameters)
        ):  # a single str is an easy slip (a regex, as for target_modules?): refused rather than guessed
            raise TypeError(f"LoraConfig: `target_parameters` must be a list of strings or None, got "
                            f"{self.target_parameters!r}")  # fmt: skip
        if isinstance(self.modules_to_save, (set, frozenset, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if self.modules_to_save is not None and isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        all_linear = isinstance(self.target_modules, str) and self.target_modules.lower() == "all-linear"
        _check_names("LoraConfig", "target_modules", _listed(self.target_modules), regex=not all_linear)
        _check_names("LoraConfig", "exclude_modules", _listed(self.exclude_modules), regex=True)
        _check_names("LoraConfig", "modules_to_save", self.modules_to_save, regex=False)
        _check_names("LoraConfig", "target_parameters", self.target_parameters, regex=False)
        # HF PEFT keeps module-name lists as sets (order means nothing; files store them sorted).
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (list, tuple, frozenset)):
                setattr(self, name, set(getattr(self, name)))
        self._check_layer_selection()

    def _check_layer_selection(self) -> None:
        if isinstance(self.layers_to_transform, bool) or not (
            self.layers_to_transform is None
            or isinstance(self.layers_to_transform, int)
            or isinstance(self.layers_to_transform, list)
            and all(isinstance(i, int) for i in self.layers_to_transform)
        ):
            raise TypeError(f"LoraConfig: layers_to_transform must be an int or a list of ints, got "
                            f"{self.layers_to_transform!r}")  # fmt: skip
        if self.layers_pattern is not None:
            _check_names("LoraConfig", "layers_pattern", _listed(self.layers_pattern), regex=True, entries="regex")
        if isinstance(self.target_modules, str) and self.layers_to_transform not in (None, []):
            raise ValueError("LoraConfig: `layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern not in (None, [], ""):
            raise ValueError("LoraConfig: `layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern not in (None, [], "") and self.layers_to_transform in (None, []):
            raise ValueError(
                "LoraConfig: When `layers_pattern` is specified, `layers_to_transform` must also be specified."
            )


@dataclass
class _PromptLearningConfig(PeftConfigBase):
    """Fields of HF PEFT's ``PromptLearningConfig``; the model-shape ones are filled in at injection."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        for name in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers"):
            _check_count(owner, name, getattr(self, name))
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            # HF PEFT's SEQ_CLS models train their head in full (fastpeft.peft.prompt_tasks)
            self.modules_to_save = list(self.modules_to_save)
            _check_names(owner, "modules_to_save", self.modules_to_save, regex=False)
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(
                f"{owner}: num_transformer_submodules={self.num_transformer_submodules} is not supported "
                "(1, or 2 for an encoder-decoder)"
            )

    @property
    def is_prompt_learning(self) -> bool:
        return True


@dataclass
class PromptTuningConfig(_PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` learned embeddings prepended to the input embeddings.

    Args:
        prompt_tuning_init: ``"RANDOM"`` (N(0, 1), like ``nn.Embedding``) or ``"TEXT"`` (the
            embeddings of ``prompt_tuning_init_text``'s tokens, repeated or cut to length).
        prompt_tuning_init_text: the text for ``"TEXT"`` init.
        tokenizer_name_or_path: a tokenizer object, or a local path ``AutoTokenizer`` can load.
    """

    PEFT_TYPE: ClassVar[str] = "PROMPT_TUNING"
    _unsupported: ClassVar[dict[str, Any]] = {"tokenizer_kwargs": None}

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: Any = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init))
        if self.prompt_tuning_init_text is not None and not isinstance(self.prompt_tuning_init_text, str):
            raise TypeError(
                f"PromptTuningConfig: prompt_tuning_init_text must be a str, got {self.prompt_tuning_init_text!r}"
            )
        if self.prompt_tuning_init not in ("RANDOM", "TEXT"):
            raise ValueError(
                f"PromptTuningConfig: prompt_tuning_init={self.prompt_tuning_init!r} is not supported "
                "('RANDOM' or 'TEXT')"
            )
        if self.prompt_tuning_init == "TEXT" and not self.inference_mode:
            if not self.prompt_tuning_init_text or self.tokenizer_name_or_path is None:
                raise ValueError(
                    "PromptTuningConfig: prompt_tuning_init='TEXT' needs prompt_tuning_init_text and "
                    "tokenizer_name_or_path"
                )


@dataclass
class PrefixTuningConfig(_PromptLearningConfig):
    """Prefix tuning: learned per-layer key/value prefixes fed to attention through the KV cache.

    Args:
        prefix_projection: learn ``[num_virtual_tokens, token_dim]`` embeddings and map them through
            ``Linear(token_dim, encoder_hidden_size) -> tanh -> Linear(encoder_hidden_size,
            num_layers * 2 * token_dim)``; without it the table itself is learned.
        encoder_hidden_size: the MLP's hidden width (default: ``token_dim``).
        init_weights: ``None`` (random) or ``"zero"`` (zero prefixes / zero last MLP layer).
    """

    PEFT_TYPE: ClassVar[str] = "PREFIX_TUNING"

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_count("PrefixTuningConfig", "encoder_hidden_size", self.encoder_hidden_size)
        _check_bool("PrefixTuningConfig", "prefix_projection", self.prefix_projection)
        if self.init_weights not in (None, "zero"):
            raise ValueError(
                f"PrefixTuningConfig: init_weights={self.init_weights!r} is not supported (None or 'zero')"
            )


@dataclass
class AdapterConfig(PeftConfigBase):
    """Bottleneck adapters (Houlsby / Pfeiffer / parallel) placed in every transformer block.

    Args:
        bottleneck_size: the adapter's inner width; default ``hidden_size // reduction_factor``.
        reduction_factor: used when ``bottleneck_size`` is ``None``.
        non_linearity: ``"relu"``, ``"gelu"``, ``"silu"``, ``"gelu_new"``, ... (what ``BottleneckAdapter`` takes).
        placement: ``"pfeiffer"`` (after each feed-forward), ``"houlsby"`` (after attention and after
            the feed-forward) or ``"parallel"`` (beside the feed-forward).
        scaling: multiplies the adapter's output.
        target_layers: block indices to adapt (default: all).
        modules_to_save: modules trained in full (a trainable copy per adapter); with ``task_type="SEQ_CLS"``
            the classification head (``classifier`` / ``score``) is added, as LoRA does.
    """

    PEFT_TYPE: ClassVar[str] = "BOTTLENECK_ADAPTER"

    bottleneck_size: int | None = None
    reduction_factor: int = 16
    non_linearity: str = "relu"
    placement: str = "pfeiffer"
    scaling: float = 1.0
    target_layers: list[int] | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        from fastpeft.ops.adapter import ACTIVATION_ALIASES

        if not isinstance(self.non_linearity, str) or self.non_linearity not in ACTIVATION_ALIASES:
            raise ValueError(
                f"AdapterConfig: non_linearity={self.non_linearity!r} is not one of {sorted(ACTIVATION_ALIASES)}"
            )
        if self.placement not in ("pfeiffer", "houlsby", "parallel"):
            raise ValueError(f"AdapterConfig: placement={self.placement!r} (pfeiffer, houlsby or parallel)")
        _check_count("AdapterConfig", "bottleneck_size", self.bottleneck_size)
        _check_count("AdapterConfig", "reduction_factor", self.reduction_factor, optional=False)
        if not is_finite_number(self.scaling):
            raise ValueError(f"AdapterConfig: scaling must be a finite number, got {self.scaling!r}")
        if self.target_layers is not None:
            layers = self.target_layers
            if isinstance(layers, tuple):
                layers = list(layers)
            if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise TypeError(f"AdapterConfig: target_layers must be a list of ints, got {self.target_layers!r}")
            self.target_layers = layers
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
            _check_names("AdapterConfig", "modules_to_save", self.modules_to_save, regex=False)


_CONFIGS: dict[str, type[PeftConfigBase]] = {
    c.PEFT_TYPE: c for c in (LoraConfig, PromptTuningConfig, PrefixTuningConfig, AdapterConfig)
}


def config_from_dict(data: dict[str, Any], source: str = "adapter_config.json") -> PeftConfigBase:
    """Build the config an ``adapter_config.json`` describes.

    Raises:
        ValueError: ``data`` is not a dict, unknown ``peft_type``, a value of the wrong type or out of
            range, or a bookkeeping key HF PEFT writes set to a value other than its default (``source``
            names the file in the message). Unknown keys are ignored with a ``UserWarning`` naming them.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    peft_type = data.pop("peft_type", None)
    if not isinstance(peft_type, str) or peft_type not in _CONFIGS:
        raise ValueError(f"{source}: peft_type {peft_type!r} is not supported (one of {sorted(_CONFIGS)})")
    cls = _CONFIGS[peft_type]
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs, unknown = {}, []
    for key, value in data.items():
        if key in names:
            kwargs[key] = value
        elif key in _HF_BOOKKEEPING:
            default = _HF_BOOKKEEPING[key]
            if default is not Any and not _is_default(value, default):
                raise ValueError(f"{source}: option {key}={value!r} is not supported by fastpeft")
        else:
            unknown.append(key)
    if unknown:
        # HF PEFT's rule: a file from a newer release (an option this one lacks) loads, with a warning.
        warnings.warn(
            f"{source}: ignoring keys fastpeft does not know for {peft_type}: {sorted(unknown)} "
            "(written by a newer PEFT release?)",
            UserWarning,
            stacklevel=2,
        )
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        # From a file, a value of the wrong type is as much a bad value as one out of range.
        raise ValueError(f"{source}: {e}") from None
