"""The README.md model card written beside a saved adapter, as HF PEFT writes one.

The Hub reads the YAML front matter: ``library_name: peft`` (the files are HF PEFT's format, so the Hub's
PEFT integration loads them), ``base_model`` when the model knows its name, and ``tags`` (``lora`` for LoRA
adapters, which the Hub needs for its LoRA features). An existing card keeps its text and its own
metadata; only the keys it lacks are added. Written atomically (temp file + rename); a symbolic link in
place of the card is replaced, never read or written through.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from torch import nn

from fastpeft.files import current_umask
from fastpeft.peft.config import PeftConfigBase

__all__ = ["card_text", "write_card_text", "write_model_card"]

CARD_NAME = "README.md"


def _front_matter(config: PeftConfigBase, base_name: str | None) -> dict[str, object]:
    tags = [f"base_model:adapter:{base_name or ''}"]
    if config.peft_type == "LORA":
        tags.append("lora")
    tags.append("fastpeft")
    meta: dict[str, object] = {}
    if base_name:
        meta["base_model"] = base_name
    meta["library_name"] = "peft"
    meta["tags"] = tags
    return meta


def _scalar(value: object) -> str:
    """A YAML scalar: plain when it is a simple name, else JSON-quoted (a JSON string is valid YAML)."""
    text = str(value)
    if re.fullmatch(r"[A-Za-z][A-Za-z0-9_./-]*", text) and text.lower() not in ("true", "false", "null", "yes", "no"):
        return text
    return json.dumps(text)


def _yaml_lines(meta: dict[str, object]) -> list[str]:
    lines = []
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {_scalar(v)}" for v in value)
        else:
            lines.append(f"{key}: {_scalar(value)}")
    return lines


def _body(config: PeftConfigBase, base_name: str | None) -> str:
    settings = {k: v for k, v in config.to_dict().items() if v not in (None, [], {}, False) and k != "peft_version"}
    rows = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in sorted(settings.items()))
    base = base_name or "<the base model>"
    return f"""
# {config.peft_type} adapter for {base}

An adapter in HF PEFT's file format (`adapter_config.json` + `adapter_model.safetensors`), trained with
fastpeft. It loads in fastpeft and in HF PEFT alike:

```python
from fastpeft import PeftModel  # or: from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "<this directory>")
```

## Settings

| option | value |
|---|---|
{rows}

## Model details

- **Adapter method:** {config.peft_type}
- **Base model:** {base}
- **Developed by / funded by / license:** [More information needed]

## Uses

What the adapter is for, and what it should not be used for: [More information needed]

## Training

- **Data:** [More information needed]
- **Procedure and hyperparameters** (learning rate, steps, batch size, sequence length, precision):
  [More information needed]

## Evaluation

Data, metrics and results: [More information needed]

## Bias, risks and limitations

The adapter inherits the base model's limitations; describe any it adds: [More information needed]
"""


def card_text(directory: str | os.PathLike, config: PeftConfigBase, model: nn.Module) -> str:
    """The README.md ``write_model_card`` would write into ``directory``: a new card, or the existing one with the
    metadata keys it lacks added. A symbolic link in place of the card is never read (it would copy another
    file's content into the adapter's card): the link is replaced by a new card.

    Raises:
        ValueError: the existing card is not UTF-8 text (named).
    """
    path = Path(directory) / CARD_NAME
    # The model's own record of where it came from (a custom model without a config has none, and a name
    # typed into the adapter config is not evidence of a Hub model).
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None)
    meta = _front_matter(config, base_name or None)
    if not path.is_file() or path.is_symlink():
        return "---\n" + "\n".join(_yaml_lines(meta)) + "\n---\n" + _body(config, base_name)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: the model card there is not UTF-8 text ({e.reason} at byte {e.start}); fastpeft adds its "
            "metadata to an existing card only when it reads as UTF-8 (re-encode it or move it away)"
        ) from None
    if text.startswith("---\n") and "\n---" in text[4:]:
        end = text.index("\n---", 4)
        head, rest = text[4:end], text[end:]
        have = {line.split(":", 1)[0].strip() for line in head.splitlines() if line and not line.startswith(" ")}
        extra = _yaml_lines({k: v for k, v in meta.items() if k not in have})
        return "---\n" + "\n".join([head, *extra]) + rest
    return "---\n" + "\n".join(_yaml_lines(meta)) + "\n---\n" + text


def write_card_text(directory: str | os.PathLike, text: str) -> None:
    """Write ``text`` as ``<directory>/README.md`` atomically (temp file + rename, which replaces a link there)."""
    path = Path(directory) / CARD_NAME
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_model_card(directory: str | os.PathLike, config: PeftConfigBase, model: nn.Module) -> None:
    """Write (or complete the metadata of) ``<directory>/README.md`` for an adapter of ``config`` on ``model``."""
    write_card_text(directory, card_text(directory, config, model))
