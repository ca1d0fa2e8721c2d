"""Bad input: one line on stderr, exit status 2, no traceback, and ``--out`` left exactly as it was."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tinymodels import listing, qa_records, write_checkpoint, write_jsonl

from fastpeft.app.cli import main


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
    latin1 = root / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    quant_str = root / "quant_str"
    quant_str.mkdir()
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (quant_str / f).write_bytes((model / f).read_bytes())
    config = json.loads((model / "config.json").read_text())
    (quant_str / "config.json").write_text(json.dumps({**config, "quantization_config": "nf4"}))
    return {
        "latin1": latin1,
        "quant_str": quant_str,
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
        ("method", ("unknown method 'ia3'",)),
        ("target", ("'foo_proj' matches no module",)),
        ("alien", ("no-such-architecture",)),
        ("vision", ("cannot build a causal LM", "vit")),
        ("zero_steps", ("--max-steps must be at least 1",)),
        ("data_dir", ("is a directory, not a JSONL file",)),
        ("latin1", ("latin1.jsonl:2: not UTF-8 text (byte 0xe9 at column 14)",)),
        ("dev_zero", ("--data /dev/zero is a character device, not a regular file",)),
        ("lr_nan", ("--lr must be a positive finite number, got nan",)),
        ("lr_inf", ("--lr must be a positive finite number, got inf",)),
        ("epochs_inf", ("--epochs must be a positive finite number, got inf",)),
        ("epochs_nan", ("--epochs must be a positive finite number, got nan",)),
        ("alpha_nan", ("--alpha must be a finite number, got nan",)),
        ("alpha_inf", ("--alpha must be a finite number, got inf",)),
        ("seed", ("--seed must be in [0, 2**63), got 18446744073709551616",)),
        ("warmup", ("--warmup-steps must be at least 0, got -5",)),
        ("quant_str", ("quant_str/config.json: quantization_config must be an object, got 'nf4'",)),
        ("huge_r", ("LoRA with r=1000000000 on 14 layers needs", "GiB, more than")),
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
        "method": {"--method": "ia3"},
        "target": {"--target-modules": "q_proj,foo_proj"},
        "alien": {"--model": str(tiny["alien"])},
        "vision": {"--model": str(tiny["vision"])},
        "zero_steps": {"--max-steps": "0"},
        "data_dir": {"--data": str(tiny["data"].parent)},
        "latin1": {"--data": str(tiny["latin1"])},
        "dev_zero": {"--data": "/dev/zero"},
        "lr_nan": {"--lr": "nan"},
        "lr_inf": {"--lr": "inf"},
        "epochs_inf": {"--epochs": "inf"},
        "epochs_nan": {"--epochs": "nan"},
        "alpha_nan": {"--alpha": "nan"},
        "alpha_inf": {"--alpha": "inf"},
        "seed": {"--seed": str(2**64)},
        "warmup": {"--warmup-steps": "-5"},
        "quant_str": {"--model": str(tiny["quant_str"])},
        "huge_r": {"--r": "1000000000"},
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


# -- data files ---------------------------------------------------------------------------------------


def test_data_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    from fastpeft.app.data import read_jsonl

    undecodable = tmp_path / "latin1.jsonl"
    undecodable.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    cases = [
        (tmp_path, f"{tmp_path}: is a directory"),
        (undecodable, f"{undecodable}:2: not UTF-8 text (byte 0xe9 at column 14)"),
        (deep, f"{deep}:2: JSON nested too deeply"),
        (Path("/dev/zero"), "/dev/zero:1: line longer than 67,108,864 bytes"),  # never ends a line
    ]
    for path, message in cases:
        with pytest.raises(ValueError) as info:
            read_jsonl(path)
        assert message in str(info.value), str(info.value)


def test_long_lines_are_cut_before_they_are_tokenized() -> None:
    from fastpeft.app.data import IGNORE_INDEX, Example, byte_tokenizer, encode_records

    tok = byte_tokenizer()
    seen: list[int] = []

    class Recording:
        bos_token_id, eos_token_id = tok.bos_token_id, tok.eos_token_id

        def __call__(self, text: str, **kwargs: object) -> dict:
            seen.append(len(text))
            return tok(text, **kwargs)

    words = ("the", "cat", "sat", "caf\u00e9", "\u65e5\u672c", " ", "\n")
    text = " ".join(words[(i * 7919) % len(words)] for i in range(10_000))  # multi-byte characters too
    whole = {t: list(tok(t, add_special_tokens=False)["input_ids"]) for t in (text, "done.", "say: ")}
    records = [{"text": text}, {"prompt": text, "completion": "done."}, {"prompt": "say: ", "completion": text}]
    bos, eos = [tok.bos_token_id], [tok.eos_token_id]
    for seq_len in (2, 17, 300):
        seen.clear()
        got = encode_records(records, Recording(), seq_len)
        assert max(seen) < 64 * seq_len + 1000, f"seq_len {seq_len}: tokenized {max(seen):,d} characters"
        want = []  # every text tokenized whole, then cut: the prompt to seq_len, the completion to what leaves
        for rec in records:  # room for its EOS
            prompt = (bos + (whole[rec["prompt"]] if "prompt" in rec else []))[:seq_len]
            room = seq_len - len(prompt) - 1
            completion = (whole[rec.get("text", rec.get("completion"))][:room] if room >= 0 else []) + eos
            labels = ([IGNORE_INDEX] * len(prompt) + completion)[:seq_len]
            if any(lab != IGNORE_INDEX for lab in labels[1:]):
                want.append(Example(tuple((prompt + completion)[:seq_len]), tuple(labels)))
        assert got == want, f"seq_len {seq_len}: not the tokens of the whole texts, cut"


_FIELDS = st.sampled_from(["text", "prompt", "completion", "x"])
_LINE = st.one_of(
    st.fixed_dictionaries({"text": st.text(max_size=20)}).map(json.dumps),
    st.fixed_dictionaries({"prompt": st.text(max_size=10), "completion": st.text(max_size=10)}).map(json.dumps),
    st.dictionaries(_FIELDS, st.none() | st.integers() | st.text(max_size=5), max_size=3).map(json.dumps),
    st.text(max_size=20),
    st.just(""),
)


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(_LINE.map(str.encode) | st.binary(max_size=12), max_size=6),
    ending=st.sampled_from([b"\n", b"\r\n"]),
    seq_len=st.integers(2, 12),
)
def test_property_any_jsonl_file_loads_or_is_a_named_value_error(
    tmp_path_factory: pytest.TempPathFactory, lines: list[bytes], ending: bytes, seq_len: int
) -> None:
    from fastpeft.app.data import encode_records, read_jsonl

    path = tmp_path_factory.mktemp("jsonl") / "data.jsonl"
    path.write_bytes(ending.join(line.replace(b"\n", b" ") for line in lines))
    try:
        records = read_jsonl(path)
    except ValueError as e:
        assert str(path) in str(e), f"the message does not name the file: {e}"
        return
    assert records and all(set(r) in ({"text"}, {"prompt", "completion"}) for r in records)
    try:
        examples = encode_records(records, _byte_tokenizer(), seq_len)
    except ValueError as e:
        assert f"seq_len={seq_len}" in str(e), str(e)
        return
    assert all(1 < len(ex.input_ids) <= seq_len and len(ex.labels) == len(ex.input_ids) for ex in examples)


@functools.cache
def _byte_tokenizer():  # noqa: ANN202 - a transformers tokenizer
    from fastpeft.app.data import byte_tokenizer

    return byte_tokenizer()


# -- faults while training, corrupt checkpoints --------------------------------------------------------


def _run_failing(argv: list[str], capsys: pytest.CaptureFixture[str], status: int, *expect: str) -> str:
    assert main(argv) == status, f"expected exit status {status} for {argv}"
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, f"expected one line on stderr, got:\n{err}"
    for text in expect:
        assert text in err, f"{text!r} not in the message: {err}"
    return err


def _state(out: Path) -> dict:
    return json.loads((out / "checkpoint" / "trainer_state.json").read_text())


def test_unwritable_out_is_refused_before_training(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    real_access = os.access
    # A read-only filesystem answers access(W_OK) with EROFS; as root, chmod cannot make one here.
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != tmp_path and real_access(p, mode, **kw))
    out = tmp_path / "out"
    _run_bad(_ft(tiny, out), out, capsys, f"--out {out}: {tmp_path} is not writable")


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    real_save, calls = safetensors.torch.save_file, []

    def disk_full_at_step_2(tensors, filename, *args, **kwargs):  # noqa: ANN001, ANN202 - save_file's signature
        calls.append(filename)
        if len(calls) > 3:  # three files a checkpoint: the second checkpoint finds the disk full
            raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_at_step_2)
    out = tmp_path / "out"
    _run_failing(_ft(tiny, out, **{"--max-steps": "2", "--save-steps": "1"}), capsys, 2,
                 "adapter_state.safetensors: cannot write the checkpoint", "No space left")  # fmt: skip
    assert _state(out)["step"] == 1, "the last good checkpoint was lost"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"], "partial results or temporary files were left"
    monkeypatch.undo()
    assert main(_ft(tiny, out, **{"--max-steps": "2", "--save-steps": "1"}) + ["--resume"]) == 0
    assert len(json.loads((out / "metrics.json").read_text())["losses"]) == 2


def test_a_diverging_run_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "out"
    argv = _ft(tiny, out, **{"--max-steps": "6", "--save-steps": "1", "--lr": "1e30", "--warmup-steps": "0"})
    err = _run_failing(argv, capsys, 3, "training stopped", "Likely cause: a learning rate too high", "--lr 1e+30")
    failed = int(err.split("step ", 1)[1].split(":", 1)[0])
    assert failed >= 2 and f"the checkpoint of step {failed - 1} in" in err, err
    state = _state(out)
    assert state["step"] == failed - 1 and all(map(math.isfinite, state["losses"])), state["losses"]
    adapter = load_file(str(out / "checkpoint" / "adapter_state.safetensors"))
    assert all(bool(t.isfinite().all()) for t in adapter.values()), "the kept checkpoint holds non-finite weights"
    assert not (out / "metrics.json").exists() and not (out / "adapter_model.safetensors").exists()
    # An update too large for float32 is caught at the first step, before anything is saved.
    out = tmp_path / "out2"
    argv = _ft(tiny, out, **{"--max-steps": "2", "--save-steps": "1", "--lr": "1e300", "--warmup-steps": "0"})
    _run_failing(argv, capsys, 3, "step 1: the update became too large for float32", "nothing saved", "--lr 1e+300")
    assert not (out / "checkpoint").exists()


def test_weights_an_update_made_non_finite_are_never_saved(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    real_step, calls = torch.optim.AdamW.step, []

    def nan_at_step_2(self, *args, **kwargs):  # noqa: ANN001, ANN202 - Optimizer.step's signature
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0][0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", nan_at_step_2)
    out = tmp_path / "out"
    _run_failing(_ft(tiny, out, **{"--max-steps": "3", "--save-steps": "1"}), capsys, 3,
                 "step 2: the updated adapter weights became non-finite", "the checkpoint of step 1")  # fmt: skip
    assert _state(out)["step"] == 1 and not (out / "metrics.json").exists()


@pytest.fixture(scope="module")
def good_checkpoint(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped after 2 of 4 steps: its checkpoint, to corrupt."""
    out = tmp_path_factory.mktemp("ckpt") / "out"
    assert main(_ft(tiny, out, **{"--max-steps": "2", "--save-steps": "1"})) == 0
    return out


def _edit_state(ckpt: Path, edit) -> None:  # noqa: ANN001 - a callable on the state dict
    path = ckpt / "trainer_state.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps(edit(state)))


def _edit_tensors(ckpt: Path, name: str, key: str, value) -> None:  # noqa: ANN001 - a tensor
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(ckpt / name))
    tensors[key] = value
    save_file(tensors, str(ckpt / name))


def _without(key: str):  # noqa: ANN202 - a state edit
    return lambda s: {k: v for k, v in s.items() if k != key}


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("list", ("trainer_state.json: expected a JSON object, got list",)),
        ("no_step", ("trainer_state.json: 'step' must be a non-negative int, got 'nothing'",)),
        ("no_config", ("trainer_state.json: 'config' must be an object, got missing",)),
        ("step_two", ("trainer_state.json: 'step' must be a non-negative int, got 'two'",)),
        ("step_float", ("trainer_state.json: 'step' must be a non-negative int, got 1000000.0",)),
        ("no_losses", ("trainer_state.json: 'losses' must hold one finite number per step (2), got 0 values",)),
        ("past_total", ("--resume: the checkpoint is at step 6, past this run's 4 steps",)),
        ("deep", ("trainer_state.json: unreadable checkpoint state (RecursionError",)),
        ("rng", ("rng.safetensors: RNG state 'cpu' is torch.uint8 (100,), expected uint8 (5056,)",)),
        ("optimizer", ("optimizer.safetensors: 0.exp_avg has shape (3, 5), parameter 0 is",)),
        ("truncated", ("optimizer.safetensors: unreadable checkpoint file",)),
    ],
)
def test_corrupt_checkpoints_are_named_on_resume(
    tiny: dict[str, Path], good_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    case: str, expect: tuple[str, ...],
) -> None:  # fmt: skip
    import shutil

    import torch

    out = tmp_path / "out"
    shutil.copytree(good_checkpoint, out)
    ckpt = out / "checkpoint"
    if case == "list":
        (ckpt / "trainer_state.json").write_text("[1, 2]")
    elif case == "deep":
        (ckpt / "trainer_state.json").write_text("[" * 100_000 + "]" * 100_000)
    elif case == "truncated":
        data = (ckpt / "optimizer.safetensors").read_bytes()
        (ckpt / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "rng":
        _edit_tensors(ckpt, "rng.safetensors", "cpu", torch.zeros(100, dtype=torch.uint8))
    elif case == "optimizer":
        _edit_tensors(ckpt, "optimizer.safetensors", "0.exp_avg", torch.zeros(3, 5))
    else:
        _edit_state(ckpt, {
            "no_step": _without("step"),
            "no_config": _without("config"),
            "step_two": lambda s: {**s, "step": "two"},
            "step_float": lambda s: {**s, "step": 1e6},
            "no_losses": lambda s: {**s, "losses": []},
            "past_total": lambda s: {**s, "step": 6, "losses": s["losses"] * 3,
                                     "scheduler": {**s["scheduler"], "last_epoch": 6}},
        }[case])  # fmt: skip
    _run_bad(_ft(tiny, out, **{"--max-steps": "4", "--save-steps": "1"}) + ["--resume"], out, capsys, *expect)


def test_merge_names_a_config_that_is_not_an_object(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    out = tmp_path / "merged"
    for text, message in (("[1]", "expected a JSON object, got list"), ("[" * 100_000 + "]" * 100_000, "not valid")):
        (adapter / "adapter_config.json").write_text(text)
        args = ["merge", "--model", str(tiny["model"]), "--adapter", str(adapter), "--out", str(out)]
        _run_bad(args, out, capsys, f"{adapter / 'adapter_config.json'}: {message}")


def test_log_notices_carry_the_name_of_the_package_that_logged_them() -> None:
    import logging

    from fastpeft.app.cli import _SourceFormatter

    def line(name: str, msg: str) -> str:
        return _SourceFormatter().format(logging.LogRecord(name, logging.WARNING, __file__, 1, msg, None, None))

    assert line("bitsandbytes.backends.cpu.ops", "Failed to load") == "bitsandbytes: Failed to load"
    assert line("transformers.modeling_utils", "x %s") == "transformers: x %s"
    assert line("fastpeft.app.train", "estimate") == "fastpeft: estimate"
    assert line("root", "plain") == "warning: plain"
