"""Broken and hostile GGUF files (issue 25 items 4 and 11, issue 26 item 10): each ends with one line naming the
file (and the tensor or key), exit status 2, within seconds; a GGUF file without the ``.gguf`` suffix is one.

The files are the tiny Llama of ``tinymodels.write_gguf``, cut short or with bytes of their header rewritten.
"""

from __future__ import annotations

import contextlib
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tinymodels import write_checkpoint, write_gguf

from fastpeft.app.cli import main

gguf = pytest.importorskip("gguf", reason="GGUF support is the optional extra: pip install 'fastpeft[gguf]'")
TIMEOUT = 60  # each fails in seconds; before, some ran past 150 s


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf_hard")
    ckpt = write_checkpoint(root / "ckpt", seed=3)
    return {"root": root, "ckpt": ckpt, "good": write_gguf(root / "good.gguf", ckpt)}


@contextlib.contextmanager
def _retyped(name: str, qtype: str):
    """While writing, store tensor ``name`` as ggml type ``qtype`` (F64, I32 as numpy dtypes; Q8_1 as raw bytes)."""
    real = gguf.GGUFWriter.add_tensor

    def add(self, tensor_name, tensor, raw_shape=None, raw_dtype=None):
        if tensor_name == name:
            if qtype == "Q8_1":
                rows, cols = tensor.shape
                tensor, raw_dtype = np.zeros((rows, cols // 32 * 40), np.uint8), gguf.GGMLQuantizationType.Q8_1
            else:
                tensor = tensor.astype({"F64": np.float64, "I32": np.int32}[qtype])
        return real(self, tensor_name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf.GGUFWriter, "add_tensor", add)
        yield


def _patched(src: Path, dst: Path, at: int, fmt: str, value) -> Path:
    data = bytearray(src.read_bytes())
    struct.pack_into(fmt, data, at, value)
    dst.write_bytes(bytes(data))
    return dst


def _tensor_offset_field(path: Path, index: int) -> int:
    """Where tensor ``index``'s data offset (its info's last uint64) sits in the file."""
    field = gguf.GGUFReader(str(path)).tensors[index].field
    return field.offset + sum(p.nbytes for p in field.parts[:-1])


def _quantize(model: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fastpeft.app.cli", "quantize", "--model", str(model), "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)


def _one_line(done: subprocess.CompletedProcess, *needles: str) -> None:
    err = done.stderr
    assert done.returncode == 2 and err.count("\n") == 1 and err.startswith("fastpeft quantize: error: "), err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("cut", ["half", "short by 100 bytes", "block_count 10**6"])
def test_issue25_item4_quantize_of_a_broken_gguf_ends_at_once(files, tmp_path, cut):
    good = files["good"]
    path = tmp_path / "broken.gguf"
    if cut == "block_count 10**6":
        with pytest.MonkeyPatch.context() as mp:
            real = gguf.GGUFWriter.add_block_count
            mp.setattr(gguf.GGUFWriter, "add_block_count", lambda self, n: real(self, 10**6))
            write_gguf(path, files["ckpt"])
    else:
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2] if cut == "half" else data[:-100])
    done = _quantize(path, tmp_path / "out")
    _one_line(done, str(path), "block_count is 1,000,000" if cut.startswith("block") else "truncated: tensor")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kind", "needle"),
    [("magic only", "too short for a GGUF header"), ("cut in the key-value area", "truncated in key"),
     ("cut in the tensor infos", "truncated in the info of tensor"),
     ("tensor_count one too high", "the tensor count is too high"), ("huge kv_count", "more than the file's"),
     ("misaligned data offset", "is not a multiple of the alignment 32"),
     ("unknown architecture", "GGUF architecture 'frobn' is not one transformers reads")],
)  # fmt: skip
def test_issue25_item11_issue26_item10_corrupt_headers_are_one_line(files, tmp_path, capsys, kind, needle):
    good, path = files["good"], tmp_path / "bad.gguf"
    data = good.read_bytes()
    if kind == "magic only":
        path.write_bytes(b"GGUF")
    elif kind == "cut in the key-value area":
        path.write_bytes(data[:2000])
    elif kind == "cut in the tensor infos":
        path.write_bytes(data[: _tensor_offset_field(good, 3)])
    elif kind == "tensor_count one too high":
        _patched(good, path, 8, "<Q", struct.unpack_from("<Q", data, 8)[0] + 1)
    elif kind == "huge kv_count":
        _patched(good, path, 16, "<Q", 2**60)
    elif kind == "misaligned data offset":
        at = _tensor_offset_field(good, 2)
        _patched(good, path, at, "<Q", struct.unpack_from("<Q", data, at)[0] + 4)
    else:
        key = data.index(b"general.architecture") + len("general.architecture") + 4 + 8
        path.write_bytes(data[:key] + b"frobn" + data[key + 5 :])
    assert main(["quantize", "--model", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and needle in err, err


@pytest.mark.parametrize("qtype", ["Q8_1", "I32", "F64"])
def test_issue25_item11_types_gguf_cannot_dequantize_name_the_tensor(files, tmp_path, capsys, qtype):
    path = tmp_path / f"{qtype}.gguf"
    with _retyped("blk.0.attn_q.weight", qtype):
        write_gguf(path, files["ckpt"])
    assert main(["quantize", "--model", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    want = f"{path}: tensor 'blk.0.attn_q.weight' has type {qtype}, which the gguf package cannot dequantize"
    assert err.count("\n") == 1 and want in err, err


def test_issue26_item10_nan_weights_name_the_file_and_tensor(files, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(files["ckpt"], ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    path = write_gguf(tmp_path / "nan.gguf", ckpt)
    assert main(["quantize", "--model", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nan.gguf (blk.1.ffn_up.weight): model.layers.1.mlp.up_proj.weight" in err, err
    assert "non-finite" in err, err


def test_issue26_item10_gguf_without_the_suffix_and_as_memory_config(files, tmp_path, capsys):
    path = tmp_path / "model.bin"
    shutil.copyfile(files["good"], path)
    assert main(["quantize", "--model", str(path), "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").is_file()
    for config in (files["good"], path):
        assert main(["memory", "--config", str(config), "--seq-len", "64", "--no-peer", "--json"]) == 0
        assert '"seq_len": 64' in capsys.readouterr().out
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    assert main(["quantize", "--model", str(not_gguf), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "notes.txt: a file that is not GGUF" in err and "does not exist" not in err, err
    assert torch.isfinite(load_file(str(tmp_path / "out" / "model.safetensors"))["lm_head.weight"]).all()
