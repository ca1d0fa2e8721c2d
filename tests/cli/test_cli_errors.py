"""Bad input: one line on stderr, exit status 2, no traceback, and ``--out`` left exactly as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tinymodels import listing, qa_records, write_checkpoint, write_jsonl

from fastpeft.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_err")
    model = write_checkpoint(root / "model", seed=4)
    no_weights = root / "no_weights"
    no_weights.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (no_weights / f).write_bytes((model / f).read_bytes())
    truncated = root / "truncated"
    truncated.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (truncated / f).write_bytes((model / f).read_bytes())
    weights = (model / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    alien = root / "alien"
    alien.mkdir()
    (alien / "config.json").write_text(json.dumps({"model_type": "no-such-architecture", "hidden_size": 8}))
    vision = root / "vision"
    vision.mkdir()
    (vision / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 8}))
    bad_data = root / "bad.jsonl"
    bad_data.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"prompt": "no completion"}\n')
    not_json = root / "not_json.jsonl"
    not_json.write_text('{"text": "fine"}\n{"text": oops}\n')
    return {
        "model": model,
        "no_weights": no_weights,
        "truncated": truncated,
        "alien": alien,
        "vision": vision,
        "data": write_jsonl(root / "qa.jsonl", qa_records()),
        "bad_data": bad_data,
        "not_json": not_json,
    }


def _run_bad(argv: list[str], out: Path | None, capsys: pytest.CaptureFixture[str], *expect: str) -> str:
    before = listing(out) if out is not None else {}
    existed = out is not None and out.exists()
    assert main(argv) == 2, f"expected exit status 2 for {argv}"
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, f"expected one line on stderr, got:\n{err}"
    assert err.startswith(f"fastpeft {argv[0]}: error: "), err
    for text in expect:
        assert text in err, f"{text!r} not in the message: {err}"
    if out is not None:
        assert out.exists() == existed, f"{out} was created or removed"
        assert listing(out) == before, f"{out} was modified"
        siblings = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
        assert not siblings, f"temporary directories left next to --out: {siblings}"
    return err


def _ft(tiny: dict[str, Path], out: Path, **over: str) -> list[str]:
    args = {"--model": str(tiny["model"]), "--data": str(tiny["data"]), "--out": str(out), "--max-steps": "2"}
    args.update(over)
    return ["finetune", *[x for kv in args.items() for x in kv], "--no-progress"]


@pytest.fixture
def previous_out(tmp_path: Path) -> Path:
    """An --out holding an earlier run's results (to show --overwrite does not touch them on bad input)."""
    out = tmp_path / "runs" / "out"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text('{"final_loss": 1.0}\n')
    (out / "adapter_config.json").write_text("{}\n")
    return out


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("missing_model", ("does not exist",)),
        ("no_weights", ("no *.safetensors",)),
        ("truncated", ("model.safetensors", "unreadable")),
        ("bad_data", ("bad.jsonl:4:", "'prompt' and 'completion'")),
        ("not_json", ("not_json.jsonl:2:", "not valid JSON")),
        ("missing_data", ("No such file",)),
        ("method", ("unknown method 'dora'",)),
        ("target", ("'foo_proj' matches no module",)),
        ("alien", ("no-such-architecture",)),
        ("vision", ("cannot build a causal LM", "vit")),
        ("zero_steps", ("--max-steps must be at least 1",)),
    ],
)
def test_finetune_bad_input(
    tiny: dict[str, Path], previous_out: Path, capsys: pytest.CaptureFixture[str], case: str, expect: tuple[str, ...]
) -> None:
    over = {
        "missing_model": {"--model": str(tiny["model"].parent / "nowhere")},
        "no_weights": {"--model": str(tiny["no_weights"])},
        "truncated": {"--model": str(tiny["truncated"])},
        "bad_data": {"--data": str(tiny["bad_data"])},
        "not_json": {"--data": str(tiny["not_json"])},
        "missing_data": {"--data": str(tiny["data"].parent / "nothing.jsonl")},
        "method": {"--method": "dora"},
        "target": {"--target-modules": "q_proj,foo_proj"},
        "alien": {"--model": str(tiny["alien"])},
        "vision": {"--model": str(tiny["vision"])},
        "zero_steps": {"--max-steps": "0"},
    }[case]
    _run_bad(_ft(tiny, previous_out, **over) + ["--overwrite"], previous_out, capsys, *expect)
    # Into a fresh --out: nothing is created.
    fresh = previous_out.parent / "fresh"
    _run_bad(_ft(tiny, fresh, **over), fresh, capsys, *expect)


def test_non_empty_out_is_refused_and_resume_needs_a_checkpoint(
    tiny: dict[str, Path], previous_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run_bad(_ft(tiny, previous_out), previous_out, capsys, "is not empty", "--overwrite")
    _run_bad(_ft(tiny, previous_out) + ["--resume"], previous_out, capsys, "no checkpoint")


def test_resume_refuses_a_different_configuration(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(_ft(tiny, out, **{"--r": "4"})) == 0
    capsys.readouterr()
    _run_bad(_ft(tiny, out, **{"--r": "8", "--max-steps": "4"}) + ["--resume"], out, capsys, "r=4", "r=8")


def test_quantize_and_merge_bad_input(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "q"
    _run_bad(["quantize", "--model", str(tiny["no_weights"]), "--out", str(out)], out, capsys, "no *.safetensors")
    prompt = tmp_path / "prompt_adapter"
    prompt.mkdir()
    (prompt / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    args = ["merge", "--model", str(tiny["model"]), "--adapter", str(prompt), "--out", str(out)]
    _run_bad(args, out, capsys, "LoRA adapters only")
    args = ["merge", "--model", str(tiny["model"]), "--adapter", str(tmp_path / "none"), "--out", str(out)]
    _run_bad(args, out, capsys, "no adapter_config.json")
