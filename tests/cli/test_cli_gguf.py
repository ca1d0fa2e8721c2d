"""GGUF files (llama.cpp's format) as ``--model`` of ``finetune``, ``quantize`` and ``merge``.

The tests write tiny GGUF files themselves from a ``write_checkpoint`` Llama: a float32 one, which must
load bit for bit as the checkpoint it was written from (so every command must give the same result on
either), and a Q8_0 one, which must load as transformers' own GGUF loader loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_close
from safetensors.torch import load_file
from tinymodels import finetune_args, write_checkpoint, write_gguf, write_qa

from fastpeft.app.cli import main
from fastpeft.loading import load_causal_lm, load_tokenizer
from fastpeft.nn import NF4Linear

pytest.importorskip("gguf", reason="GGUF support is the optional extra: pip install 'fastpeft[gguf]'")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    ckpt = write_checkpoint(root / "ckpt", seed=8)
    return {
        "ckpt": ckpt,
        "f32": write_gguf(root / "tiny-f32.gguf", ckpt),
        "q8": write_gguf(root / "tiny-q8_0.gguf", ckpt, quantized="Q8_0"),
        "data": write_qa(root),
    }


def _sd(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return model.state_dict()


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(a.keys() ^ b.keys())}"
    for k in a:
        d = (a[k].double() - b[k].double()).abs().max().item() if a[k].shape == b[k].shape else "shape"
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max abs diff {d})"


def test_float32_gguf_loads_as_the_checkpoint_it_was_written_from(files: dict[str, Path]) -> None:
    for quantize in (False, True):
        a = _sd(load_causal_lm(files["f32"], quantize=quantize))
        b = _sd(load_causal_lm(files["ckpt"], quantize=quantize))
        _assert_same(a, b, f"quantize={quantize}: GGUF vs safetensors")
    text = "say moon: moon moon. naïve ✓"
    ours, theirs = load_tokenizer(files["f32"]), load_tokenizer(files["ckpt"])
    assert ours(text)["input_ids"] == theirs(text)["input_ids"], "the GGUF's tokenizer encodes differently"
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)


def test_q8_0_gguf_loads_as_transformers_loads_it(files: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    from fastpeft.peft import quantize_model

    path = files["q8"]
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    _assert_same(_sd(load_causal_lm(path)), _sd(ref), "dense: fastpeft vs transformers' GGUF loading")
    streamed = load_causal_lm(path, quantize=True)
    nf4 = {n for n, m in streamed.named_modules() if isinstance(m, NF4Linear)}
    assert len(nf4) == 14, sorted(nf4)
    _assert_same(_sd(streamed), _sd(quantize_model(ref)), "NF4 streamed from GGUF vs quantize_model")


def test_finetune_quantize_and_merge_take_a_gguf_file(files: dict[str, Path], tmp_path: Path) -> None:
    runs = {}
    for kind in ("ckpt", "f32"):
        out = tmp_path / f"run-{kind}"
        extra = ("--method", "qlora", "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2")
        assert main(finetune_args(files[kind], files["data"], out, *extra)) == 0
        runs[kind] = json.loads((out / "metrics.json").read_text())["losses"]
    assert runs["f32"] == runs["ckpt"], f"GGUF run {runs['f32']} != checkpoint run {runs['ckpt']}"
    adapter = tmp_path / "run-f32"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(files["f32"])

    for command, extra in (("quantize", ()), ("merge", ("--adapter", str(adapter)))):
        written = {}
        for kind in ("ckpt", "f32"):
            written[kind] = tmp_path / f"{command}-{kind}"
            assert main([command, "--model", str(files[kind]), "--out", str(written[kind]), *extra]) == 0
        weights = [load_file(str(written[k] / "model.safetensors")) for k in ("f32", "ckpt")]
        _assert_same(*weights, f"{command}: from the GGUF file vs from the checkpoint")
        assert (written["f32"] / "tokenizer.json").is_file(), f"{command} did not write the GGUF's tokenizer"
        text = "say sun: sun sun."
        ids = [load_tokenizer(written[k])(text)["input_ids"] for k in ("f32", "ckpt")]
        assert ids[0] == ids[1], f"{command}: the written tokenizer encodes differently"


def test_gguf_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.gguf"
    assert main(["quantize", "--model", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    assert main(["quantize", "--model", str(junk), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "junk.gguf" in err, err


def test_merge_writes_a_gguf_base_in_its_own_dtype(files: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from fastpeft.gguf_file import read_gguf_info

    assert read_gguf_info(files["f32"]).weight_dtype == "float32"
    assert read_gguf_info(files["q8"]).weight_dtype == "bfloat16"
    adapter = tmp_path / "run"
    assert main(finetune_args(files["q8"], files["data"], adapter, "--method", "lora", "--max-steps", "1")) == 0
    kept = {}
    for dtype in (None, "float32"):
        out = tmp_path / f"merged-{dtype}"
        extra = ("--dtype", dtype) if dtype else ()
        assert main(["merge", "--model", str(files["q8"]), "--adapter", str(adapter), "--out", str(out), *extra]) == 0
        kept[dtype] = load_file(str(out / "model.safetensors"))
        assert f"in {dtype or 'bfloat16'}, written to" in capsys.readouterr().out
        config = json.loads((out / "config.json").read_text())
        assert config.get("dtype") == (dtype or "bfloat16"), config.get("dtype")
    assert {t.dtype for t in kept[None].values() if t.is_floating_point()} == {torch.bfloat16}
    assert {t.dtype for t in kept["float32"].values() if t.is_floating_point()} == {torch.float32}
    for k, t in kept["float32"].items():  # the bf16 default: the same merge, in bf16 arithmetic
        assert_close(kept[None][k], t, msg=k)


def test_loading_uses_no_deprecated_transformers_argument(files: dict[str, Path]) -> None:
    # a fresh interpreter: transformers warns once per process
    import subprocess
    import sys

    code = ("import sys; from fastpeft.loading import load_causal_lm; "
            "[load_causal_lm(p, quantize=q) for p in sys.argv[1:] for q in (False, True)]")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, str(files["q8"]), str(files["ckpt"])], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "deprecated" not in out.stderr, out.stderr[-3000:]
