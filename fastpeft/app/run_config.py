"""Config files of ``fastpeft finetune``: ``--config run.yaml`` (or ``.toml`` / ``.json``) and ``OUT/run_config.yaml``.

A config file is one mapping whose keys are the flags' names, with dashes or underscores (``grad-accum`` or
``grad_accum``), e.g.::

    model: /models/SmolLM2-135M
    data: train.jsonl
    eval_split: 0.1
    lr: 2.0e-4
    save_best: true

``parse_args`` feeds the file through the parser as defaults, so a flag on the command line wins over the file and
every value is checked by the flag's own type and choices (``ValueError`` naming the file and the key). An unknown
key is refused, naming it and the file. A switch (``--save-best``, ``--no-progress``) takes ``true`` / ``false``; a
comma-separated option (``--target-modules``) also takes a list. YAML needs PyYAML (a dependency of transformers);
TOML is read by ``tomllib`` (Python 3.11+, else ``tomli``).

Every run writes ``OUT/run_config.yaml`` with its results (``write_run_config``): every flag with its resolved
value (defaults included; ``method``, ``device``, ``lr``, ``gradient_checkpointing`` and ``distributed`` as the run
decided them; paths made absolute), so ``fastpeft finetune --config OUT/run_config.yaml --out NEW`` repeats the run.
``--resume`` and ``--overwrite`` are not recorded (they act on one directory, once); ``--max-steps`` and
``--warmup-steps`` are recorded as given (None: derived from the same data again).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["NOT_RECORDED", "RUN_CONFIG", "config_defaults", "flags_of", "parse_args", "read_config",
           "write_run_config"]  # fmt: skip

RUN_CONFIG = "run_config.yaml"  # in --out, written with the results
NOT_RECORDED = ("config", "resume", "overwrite")
_INVERTED = {"progress": "no_progress", "chunked_loss": "no_chunked_loss"}  # TrainConfig field -> the flag's dest
_PATHS = ("model", "data", "eval_data", "out")
_SUFFIXES = (".yaml", ".yml", ".toml", ".json")


def read_config(path: str | Path) -> dict[str, Any]:
    """The mapping in the config file ``path`` (YAML, TOML or JSON, by its suffix).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an unknown suffix, a file that does not parse or holds no mapping (named with the file).
        ImportError: a YAML file without PyYAML (unless it is JSON, as ``run_config.yaml`` is without PyYAML).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"--config {path}: expected a .yaml, .yml, .toml or .json file")
    if path.is_dir():
        raise ValueError(f"--config {path}: is a directory, not a config file")
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".json":
            obj = json.loads(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            obj = tomllib.loads(text)
        else:
            obj = _yaml(path, text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, TOMLDecodeError and yaml.YAMLError are ValueErrors
        raise ValueError(f"--config {path}: not valid {suffix[1:].upper()} ({' '.join(str(e).split())})") from None
    if obj is None:
        obj = {}
    if not isinstance(obj, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got {type(obj).__name__}")
    return obj


def _yaml(path: Path, text: str) -> Any:
    try:
        import yaml
    except ImportError:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ImportError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(" ".join(str(e).split())) from None


def _typed(where: str, action: argparse.Action, value: Any) -> Any:
    """``value`` as the flag ``action`` would have parsed it (its type, its choices)."""
    if action.nargs == 0:  # a switch: store_true, store_false, BooleanOptionalAction
        if value is None and action.default is None:
            return None
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if value is None:
        if action.default is None:
            return None
        raise ValueError(f"{where} cannot be null (its default is {action.default!r})")
    if isinstance(value, list) and action.type is None and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where} must be a single value, got {value!r}")
    try:
        typed = action.type(str(value)) if action.type is not None else str(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        kind = getattr(action.type, "__name__", "value")
        raise ValueError(f"{where}: invalid {kind} value {value!r}") from None
    if action.choices is not None and typed not in action.choices:
        raise ValueError(f"{where}: {typed!r} is not one of {', '.join(map(str, action.choices))}")
    return typed


def config_defaults(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The config file ``path`` as ``{dest: value}`` for ``parser`` (``fastpeft finetune``'s), every value checked.

    Raises:
        ValueError: an unknown or repeated key, or a value the flag refuses, named with the file.
    """
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    values: dict[str, Any] = {}
    for key, value in read_config(path).items():
        dest = str(key).replace("-", "_")
        where = f"--config {path}: {key}"
        if dest == "config":
            raise ValueError(f"{where}: a config file cannot name another one")
        if dest not in actions:
            raise ValueError(f"--config {path}: unknown key {key!r} (not a fastpeft finetune flag)")
        if dest in values:
            raise ValueError(f"--config {path}: {key!r} given twice (dashes and underscores name the same flag)")
        values[dest] = _typed(where, actions[dest], value)
    return values


def _finetune_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["finetune"]


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``; for ``finetune --config FILE`` the file's values become the defaults first,
    so the command line wins over the file."""
    args = parser.parse_args(argv)
    if getattr(args, "command", None) != "finetune" or not getattr(args, "config", None):
        return args
    finetune = _finetune_parser(parser)
    finetune.set_defaults(**config_defaults(args.config, finetune))
    return parser.parse_args(argv)


def flags_of(fields: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flags (by dest) a run's resolved ``TrainConfig`` fields stand for, plus ``extra`` (flags the CLI alone
    reads, e.g. ``memory_budget``): paths absolute, the switches the CLI inverts (``--no-progress``) inverted."""
    flags: dict[str, Any] = {}
    for name, value in fields.items():
        if name in NOT_RECORDED:
            continue
        if name in _INVERTED:
            flags[_INVERTED[name]] = not value
        elif name in _PATHS and value is not None:
            flags[name] = str(Path(value).resolve())
        else:
            flags[name] = value
    flags.update(extra or {})
    return dict(sorted(flags.items()))


def write_run_config(path: Path, flags: dict[str, Any]) -> None:
    """``flags`` as the YAML file ``path`` that ``--config`` reads (JSON, which is YAML too, without PyYAML)."""
    header = "# fastpeft finetune --config THIS_FILE --out NEW_DIR repeats this run (flags given there win)\n"
    try:
        import yaml
    except ImportError:
        body = json.dumps(flags, indent=2, sort_keys=True) + "\n"
        header = ""  # a JSON file has no comments
    else:
        body = yaml.safe_dump(flags, sort_keys=True, default_flow_style=False, allow_unicode=True)
    path.write_text(header + body, encoding="utf-8")
