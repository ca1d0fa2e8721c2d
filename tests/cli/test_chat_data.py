"""Chat data (``{"messages": [...]}``) and ``datasets`` / Parquet inputs for ``fastpeft finetune --data``.

The tokenizer is ``byte_tokenizer`` (one token a byte, specials whole), so the expected ids and labels are built
here segment by segment, independently of the chat templates' rendering and of the code under test.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close
from tinymodels import finetune_args, write_checkpoint, write_jsonl

from fastpeft.app.cli import main
from fastpeft.app.data import IGNORE_INDEX, byte_tokenizer, encode_records, read_jsonl, read_records

# A Zephyr-style template (role headers as plain text, </s> ends every turn), and the same rendering with the
# assistant's content and end of turn in {% generation %} blocks (what TRL's assistant_only_loss needs).
ZEPHYR = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ZEPHYR_GEN = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}{{ '\\n' }}{% endgeneration %}"
    "{% else %}{{ m.content }}{{ eos_token }}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# ChatML with a default system turn when the conversation has none (as SmolLM2's template does), no BOS.
CHATML = (
    "{% for m in messages %}{% if loop.first and m.role != 'system' %}"
    "{{ '<|im_start|>system\nYou are a small helpful model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_GEN = (
    "{% for m in messages %}{% if loop.first and m.role != 'system' %}"
    "{{ '<|im_start|>system\nYou are a small helpful model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m.role + '\n' }}{% if m.role == 'assistant' %}{% generation %}"
    "{{ m.content + '<|im_end|>\n' }}{% endgeneration %}{% else %}{{ m.content + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "say cat"},
    {"role": "assistant", "content": "cat cat. "},  # trailing space: the content's own, so trained
    {"role": "user", "content": "and dog?"},
    {"role": "assistant", "content": "dog!"},
]


def chat_tokenizer(template: str | None, chatml: bool = False):
    tok = byte_tokenizer()
    if chatml:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


def expected(tok, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids and labels of text segments ``(text, trained)``, each tokenized alone (the byte tokenizer has no
    merges, so this is the whole text's tokenization)."""
    ids, labels = [], []
    for text, trained in segments:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def one(records: list[dict], tok, seq_len: int = 256):
    (ex,) = encode_records(records, tok, seq_len)
    return list(ex.input_ids), list(ex.labels)


def test_multi_turn_labels_are_the_assistant_turns_after_their_headers_only() -> None:
    want = expected(
        byte_tokenizer(),
        [
            ("<s><|system|>\nBe brief.</s>\n<|user|>\nsay cat</s>\n<|assistant|>\n", False),
            ("cat cat. </s>\n", True),
            ("<|user|>\nand dog?</s>\n<|assistant|>\n", False),
            ("dog!</s>\n", True),
        ],
    )
    for template in (ZEPHYR, ZEPHYR_GEN):  # by rendered prefixes / by transformers' generation mask
        got = one([{"messages": CONVERSATION}], chat_tokenizer(template))
        assert got == want, f"{'generation' if template is ZEPHYR_GEN else 'prefix'} template: {got} != {want}"
    assert sum(1 for i in want[0] if i == 1) == 1, "one BOS: the template's, none added"


def test_chatml_with_a_default_system_turn_and_no_bos() -> None:
    tok = chat_tokenizer(CHATML, chatml=True)
    got = one([{"messages": CONVERSATION[1:3]}], tok)
    want = expected(
        tok,
        [
            ("<|im_start|>system\nYou are a small helpful model.<|im_end|>\n<|im_start|>user\nsay cat<|im_end|>\n"
             "<|im_start|>assistant\n", False),
            ("cat cat. <|im_end|>\n", True),
        ],
    )  # fmt: skip
    assert got == want, (got, want)
    assert tok.bos_token_id not in got[0], "the template writes no BOS: none is added"


@pytest.mark.parametrize(("plain", "marked", "chatml"), [(ZEPHYR, ZEPHYR_GEN, False), (CHATML, CHATML_GEN, True)])
def test_prefix_mask_equals_transformers_assistant_tokens_mask(plain: str, marked: str, chatml: bool) -> None:
    """What TRL's assistant_only_loss trains (transformers' mask of the {% generation %} blocks) on the marked
    template is what the prefix rendering finds on the unmarked one."""
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:3] + [{"role": "user", "content": "bye"}]):
        marked_tok = chat_tokenizer(marked, chatml)
        out = marked_tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)  # fmt: skip
        theirs = [t if m else IGNORE_INDEX for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True)]
        assert any(m for m in out["assistant_masks"]), "transformers found no assistant token: nothing compared"
        ours = one([{"messages": messages}], chat_tokenizer(plain, chatml))
        assert ours == (list(out["input_ids"]), theirs), (messages, ours, theirs)


# Real templates, as TRL ships them with a {% generation %} twin for assistant_only_loss (read from the installed
# package): on each, the prefix rendering of the plain one finds what transformers' mask finds on the twin.
TRL_TEMPLATES = ["llama3", "qwen3_instruct_2507", "gemma3", "phi3", "cohere2", "lfm2"]


@pytest.mark.parametrize("name", TRL_TEMPLATES)
def test_prefix_mask_equals_trls_training_templates(name: str) -> None:
    pytest.importorskip("trl")
    from importlib.resources import files

    folder = files("trl") / "chat_templates"
    plain, marked = (folder / f"{name}.jinja").read_text(), (folder / f"{name}_training.jinja").read_text()
    assert "generation %}" not in plain and "generation %}" in marked, name
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:3]):
        marked_tok = chat_tokenizer(marked)
        rendered = marked_tok.apply_chat_template(messages, tokenize=False)
        assert rendered == chat_tokenizer(plain).apply_chat_template(messages, tokenize=False), "renderings differ"
        out = marked_tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)  # fmt: skip
        theirs = [t if m else IGNORE_INDEX for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True)]
        ours = one([{"messages": messages}], chat_tokenizer(plain), seq_len=4096)
        assert ours == (list(out["input_ids"]), theirs), f"{name}, {len(messages)} messages"
        answer = messages[-1]["content"].strip()  # templates may trim it
        assert answer in marked_tok.decode([t for t in theirs if t != IGNORE_INDEX]), f"{answer!r} is not trained"


def test_cut_inside_an_assistant_turn_ends_in_eos_and_a_turn_past_seq_len_drops(tmp_path: Path, caplog) -> None:
    tok = chat_tokenizer(ZEPHYR)
    header = "<s><|user|>\nsay cat</s>\n<|assistant|>\n"
    n = len(tok(header, add_special_tokens=False)["input_ids"])
    long = [{"role": "user", "content": "say cat"}, {"role": "assistant", "content": "c" * 40}]
    ids, labels = one([{"messages": long}], tok, n + 5)
    want_ids, want_labels = expected(tok, [(header, False), ("cccc</s>", True)])
    assert (ids, labels) == (want_ids, want_labels), (ids, labels)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": long}, {"messages": CONVERSATION}])
    with caplog.at_level(logging.WARNING, logger="fastpeft.app.data"):
        examples = encode_records(read_jsonl(data), tok, n + 1)  # line 2's first answer starts after n + 1
    assert len(examples) == 1 and examples.dropped == [f"{data}:2"], examples.dropped
    assert any("1 of 2 examples dropped" in r.getMessage() and f"{data}:2" in r.getMessage() for r in caplog.records)


def _error(tmp_path: Path, lines: list, tok=None) -> str:
    data = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError) as info:
        encode_records(read_jsonl(data), tok or chat_tokenizer(ZEPHYR), 256)
    return str(info.value).replace(str(data), "F")


def test_bad_conversations_name_the_line(tmp_path: Path) -> None:
    good = {"messages": CONVERSATION[1:3]}
    user = {"role": "user", "content": "hi"}
    cases = [
        ({"messages": []}, "F:2: field 'messages' is an empty conversation"),
        ({"messages": "hi"}, "F:2: field 'messages' must be a list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "F:2: message 1 has role 'bot': expected one of system"),
        ({"messages": [user, {"role": "assistant", "content": 3}]}, "F:2: message 2: 'content' must be a string"),
        ({"messages": [user, {"role": "assistant"}]}, "F:2: message 2 has no 'content'"),
        ({"messages": [user, {"role": "assistant", "content": "a", "tool_calls": [{}]}]}, "['tool_calls']"),
        ({"messages": [user]}, "F:2: the conversation has no assistant turn"),
        ({"messages": [user, {"role": "assistant", "content": "\ud800"}]}, "F:2: message 2: 'content' holds a lone"),
        ({"messages": [user, {"role": "tool", "content": "42"}, CONVERSATION[2]]}, "F:2: a 'tool' turn"),
        ({"text": "plain"}, "F:2: a text / prompt-completion record among chat records (the first at F:1)"),
        ({"messages": CONVERSATION[1:3], "text": "x"}, "F:2: holds both 'messages' and 'text'"),
    ]
    for line, message in cases:
        got = _error(tmp_path, [good, line])
        assert message in got, f"{line}: {got!r}"
    got = _error(tmp_path, [{"text": "plain"}, good])
    assert "F:2: a chat record among text / prompt-completion records (the first at F:1)" in got, got
    assert "F:1: the conversation opens with an assistant turn" in _error(tmp_path, [{"messages": CONVERSATION[2:3]}])


def test_templates_that_cannot_label_a_conversation_are_refused_naming_it(tmp_path: Path) -> None:
    good = {"messages": CONVERSATION[1:3]}
    got = _error(tmp_path, [good, good], chat_tokenizer(None))
    assert got.startswith("F:1: ") and "chat_template" in got and "chat_template.jinja" in got, got
    # Rewrites past turns (only the last answer is written in full), as reasoning-dropping templates do.
    rewriting = (
        "{% for m in messages %}<|{{ m.role }}|>{% if m.role == 'assistant' and not loop.last %}...{% else %}"
        "{{ m.content }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    got = _error(tmp_path, [good, {"messages": CONVERSATION}], chat_tokenizer(rewriting))
    assert got.startswith("F:2: the chat template does not render this conversation turn by turn"), got
    refusing = "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + ZEPHYR
    got = _error(tmp_path, [good, {"messages": CONVERSATION}], chat_tokenizer(refusing))
    assert got.startswith("F:2: the chat template refuses this conversation") and "no system role" in got, got


ROWS = {
    "text": [{"text": "the cat sat."}, {"text": "a dog ran to the gate."}],
    "prompt": [{"prompt": "say cat: ", "completion": "cat."}, {"prompt": "say dog: ", "completion": "dog dog."}],
    "chat": [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}],
}


@pytest.mark.parametrize("kind", sorted(ROWS))
def test_datasets_directories_and_parquet_give_the_jsonl_examples(tmp_path: Path, kind: str) -> None:
    import datasets

    rows, tok = ROWS[kind], chat_tokenizer(ZEPHYR)
    want = encode_records(read_records(write_jsonl(tmp_path / "d.jsonl", rows)), tok, 256)
    ds = datasets.Dataset.from_list([{**r, "id": i} for i, r in enumerate(rows)])  # an extra column, ignored
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "parts").mkdir()
    ds.select([0]).to_parquet(str(tmp_path / "parts" / "a.parquet"))
    ds.select([1]).to_parquet(str(tmp_path / "parts" / "b.parquet"))
    for name in ("saved", "dict", "d.parquet", "parts"):
        records = read_records(tmp_path / name)
        assert list(records) == list(read_records(tmp_path / "d.jsonl")), name
        assert encode_records(records, tok, 256) == want, name
    assert read_records(tmp_path / "dict").where == [f"{tmp_path / 'dict'}[train][0]", f"{tmp_path / 'dict'}[train][1]"]
    assert read_records(tmp_path / "parts").where[1] == f"{tmp_path / 'parts' / 'b.parquet'}[0]"


def test_dataset_rows_are_checked_and_named_like_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    datasets.Dataset.from_list([{"text": "fine"}, {"text": "ok"}, {"text": "\U0001f600 x"}]).to_parquet(
        str(tmp_path / "fine.parquet")
    )
    # Arrow gives every message every field of the schema: a null one is absent.
    sparse = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "tool_calls": None}]
    datasets.Dataset.from_list([{"messages": sparse}]).save_to_disk(str(tmp_path / "sparse"))
    assert read_records(tmp_path / "sparse") == [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "yo"}]}]  # fmt: skip
    bad = datasets.Dataset.from_list([{"messages": CONVERSATION[1:3]}, {"messages": []}])
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"bad\[1\]: field 'messages' is an empty conversation"):
        read_records(tmp_path / "bad")
    datasets.Dataset.from_list([{"question": "q", "answer": "a"}]).to_parquet(str(tmp_path / "qa.parquet"))
    with pytest.raises(ValueError, match=r"qa\.parquet\[0\]: expected 'text'.*got keys \['answer', 'question'\]"):
        read_records(tmp_path / "qa.parquet")
    datasets.DatasetDict({"test": bad}).save_to_disk(str(tmp_path / "nosplit"))
    with pytest.raises(ValueError, match=r"a DatasetDict without a 'train' split \(it has \['test'\]\)"):
        read_records(tmp_path / "nosplit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is a directory, not a JSONL file, a datasets directory"):
        read_records(tmp_path / "empty")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"junk\.parquet: not a readable Parquet file"):
        read_records(tmp_path / "junk.parquet")
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing.parquet")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    for name in ("bad", "fine.parquet"):
        with pytest.raises(ValueError, match="needs the datasets package: pip install datasets"):
            read_records(tmp_path / name)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama whose tokenizer gets its template from ``chat_template.jinja`` in the model directory."""
    model = write_checkpoint(tmp_path_factory.mktemp("chat") / "model", seed=1)
    (model / "chat_template.jinja").write_text(ZEPHYR)
    return model


def test_finetune_on_chat_jsonl_packed_and_not(chat_model: Path, tmp_path: Path) -> None:
    from fastpeft.loading import load_tokenizer

    assert load_tokenizer(chat_model).chat_template == ZEPHYR
    words = ["cat", "dog", "sun", "moon", "tree", "fish"]
    convs = [[{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}."}] for w in words]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs])
    first = {}
    for packing in ("on", "off"):
        out = tmp_path / packing
        args = finetune_args(chat_model, data, out, "--batch-size", "6", "--max-steps", "2", "--packing", packing)
        assert main(args) == 0, packing
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["steps"] == 2 and all(math.isfinite(x) for x in metrics["losses"]), metrics["losses"]
        assert metrics["packed"] == (packing == "on"), metrics["packed"]
        first[packing] = metrics["losses"][0]
    # One batch holds every conversation: the same assistant tokens, the same mean loss, packed or not.
    assert_close(torch.tensor(first["on"]), torch.tensor(first["off"]), msg="first loss, packed vs padded")


def test_finetune_chat_without_a_template_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_checkpoint(tmp_path / "model")
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    capsys.readouterr()
    assert main(finetune_args(model, data, tmp_path / "out", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{data}:1:" in err and "chat_template.jinja" in err, err
