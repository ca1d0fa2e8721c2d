"""Hostile or broken output directories for ``save_pretrained`` (issue 25, items 2 and 12): links inside the
directory are never followed, and a file, a read-only directory or a non-UTF-8 card give one clear error."""

from __future__ import annotations

import os
import tempfile

import pytest
from tiny_models import build

from fastpeft import LoraConfig, get_peft_model


def _two_adapters():
    pm = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    return pm


def test_issue25_item2_adapter_folder_link_is_not_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    save = tmp_path / "save"
    save.mkdir()
    (save / "b").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match=r"save/b is a symbolic link"):
        _two_adapters().save_pretrained(save)
    assert list(outside.iterdir()) == [], "the adapter was written through the link"
    assert not (save / "adapter_config.json").exists(), "a refused save wrote some files first"


def test_issue25_item2_readme_link_is_replaced_not_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET CONTENT\n", encoding="utf-8")
    save = tmp_path / "save"
    save.mkdir()
    (save / "README.md").symlink_to(secret)
    (save / "adapter_config.json").symlink_to(secret)
    get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(save)
    card = save / "README.md"
    assert not card.is_symlink() and "TOP SECRET" not in card.read_text(encoding="utf-8"), "the link's target leaked"
    assert not (save / "adapter_config.json").is_symlink()
    assert secret.read_text(encoding="utf-8") == "TOP SECRET CONTENT\n", "the link's target was written to"


def test_issue25_item12_save_onto_a_file_is_a_clear_error(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    pm = _two_adapters()
    with pytest.raises(ValueError, match=r"a-file: exists and is not a directory"):
        pm.save_pretrained(target)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "b").write_text("x")  # a file where adapter b's folder goes
    with pytest.raises(ValueError, match=r"dir/b: exists and is not a directory"):
        pm.save_pretrained(tmp_path / "dir")
    assert not (tmp_path / "dir" / "adapter_config.json").exists()


def test_issue25_item12_read_only_directory_names_it(tmp_path, monkeypatch):
    save = tmp_path / "ro"
    save.mkdir()
    os.chmod(save, 0o555)
    if os.geteuid() == 0:  # root writes anyway: make the temporary directory fail as a read-only one does

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(save / ".tmp-x"))

        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    pm = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    try:
        with pytest.raises(PermissionError) as info:
            pm.save_pretrained(save)
    finally:
        os.chmod(save, 0o755)
    message = str(info.value)
    assert f"{save}: cannot write the adapter there" in message and ".tmp-" not in message, message


def test_issue25_item12_non_utf8_readme_is_named(tmp_path):
    save = tmp_path / "save"
    save.mkdir()
    (save / "README.md").write_bytes(b"caf\xe9 latin-1 card\n")
    pm = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"README\.md: the model card there is not UTF-8"):
        pm.save_pretrained(save)
    assert (save / "README.md").read_bytes() == b"caf\xe9 latin-1 card\n"
    assert not (save / "adapter_model.safetensors").exists(), "the adapter was half saved before the refusal"
