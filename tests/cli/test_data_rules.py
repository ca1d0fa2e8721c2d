"""Tokenizing data files: no example dropped without a word, cut texts keep their EOS, BOS by the tokenizer's rule."""

from __future__ import annotations

import logging

from fastpeft.app.data import adds_bos, byte_tokenizer, encode_records, read_jsonl


def test_an_example_whose_prompt_fills_seq_len_is_counted_and_named(tmp_path, caplog):
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"prompt": "q", "completion": "a"}\n\n{"prompt": "' + "x" * 40 + '", "completion": "y"}\n'
        '{"text": "fine"}\n{"prompt": "' + "z" * 40 + '", "completion": "w"}\n'
    )
    with caplog.at_level(logging.WARNING, logger="fastpeft.app.data"):
        examples = encode_records(read_jsonl(data), byte_tokenizer(), 16)
    assert len(examples) == 2 and examples.dropped == [f"{data}:3", f"{data}:5"]
    (record,) = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert "2 of 4 examples dropped" in record.getMessage() and f"{data}:3" in record.getMessage()


def test_a_text_or_completion_cut_to_seq_len_keeps_its_eos():
    tok = byte_tokenizer()
    text, completion = encode_records([{"text": "t" * 50}, {"prompt": "say: ", "completion": "c" * 50}], tok, 12)
    for ex in (text, completion):
        assert len(ex.input_ids) == 12 and ex.input_ids[-1] == tok.eos_token_id and ex.labels[-1] == tok.eos_token_id


def test_bos_only_where_the_tokenizer_adds_one():
    tok = byte_tokenizer()
    assert adds_bos(tok)
    (ex,) = encode_records([{"text": "hi"}], tok, 16)
    assert ex.input_ids[0] == tok.bos_token_id
    tok._tokenizer.post_processor = None  # a tokenizer whose rule is no BOS (SmolLM2's GGUF tokenizer is one)
    assert not adds_bos(tok)
    (ex,) = encode_records([{"text": "hi"}], tok, 16)
    assert tok.bos_token_id not in ex.input_ids and ex.input_ids[-1] == tok.eos_token_id
