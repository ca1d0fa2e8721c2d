"""Bad input: one line on stderr, exit status 2, no traceback, and ``--out`` left exactly as it was."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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


# -- data files ---------------------------------------------------------------------------------------


def test_data_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    from fastpeft.data import read_jsonl

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
    from fastpeft.data import IGNORE_INDEX, Example, byte_tokenizer, encode_records

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
        want = []  # every text tokenized whole, then cut
        for rec in records:
            prompt = bos + (whole[rec["prompt"]] if "prompt" in rec else [])
            completion = whole[rec.get("text", rec.get("completion"))] + eos
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
    from fastpeft.data import encode_records, read_jsonl

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
    from fastpeft.data import byte_tokenizer

    return byte_tokenizer()
