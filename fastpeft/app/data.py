"""Training data for ``fastpeft finetune``: reading data files, tokenization, deterministic batching.

A data file holds one JSON object a line, either ``{"text": ...}`` (the loss covers every token) or
``{"prompt": ..., "completion": ...}`` (the loss covers only the completion's tokens and the end of
sequence). Each line becomes one example ``[bos] + tokens + eos``: the BOS only where the tokenizer itself adds
one (its own rule, as ``tokenizer(text)`` shows it), the EOS always. A text or completion too long for
``seq_len`` is cut at its end and keeps its EOS; a prompt that leaves no room for a completion token drops its
example, with one warning naming the first such line and the count (``Examples.dropped``).

Or a line is a chat, ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered by the tokenizer's chat
template with the loss on the assistant turns only (``fastpeft.app.chat``: the template writes the BOS and the
end-of-turn tokens, nothing is added). An assistant turn cut by ``seq_len`` ends in the EOS; a conversation with
no assistant token left within ``seq_len`` is dropped and counted as above. One file holds chats or the other
two forms, not both. ``read_records`` also reads a ``datasets`` directory or Parquet files
(``fastpeft.app.dataset_files``), whose rows take the same forms.

Batches are drawn without replacement in an order fixed by ``(seed, epoch)``, so a position
``(epoch, batch_index)`` is all a checkpoint needs to continue the stream exactly.

Without a data file the built-in corpus below is used, with a byte-level tokenizer built in memory
(``byte_tokenizer``): the embedded demo needs no download.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastpeft.app import chat, dataset_files

__all__ = [
    "IGNORE_INDEX",
    "TINY_CORPUS",
    "Batches",
    "Example",
    "Examples",
    "Records",
    "adds_bos",
    "byte_tokenizer",
    "MAX_LINE_BYTES",
    "check_record",
    "encode_records",
    "leading_ids",
    "read_jsonl",
    "read_records",
]

IGNORE_INDEX = -100  # the label transformers' cross-entropy skips
_log = logging.getLogger(__name__)

# A small corpus with plenty of repeated structure, so a few hundred steps visibly lower the loss.
TINY_CORPUS: tuple[str, ...] = (
    "the cat sat on the mat.",
    "the dog sat on the rug.",
    "the cat ran to the door.",
    "the dog ran to the gate.",
    "a bird sang in the tree.",
    "a bird flew over the tree.",
    "the sun is warm in the morning.",
    "the moon is bright at night.",
    "the rain falls on the roof.",
    "the wind blows over the hill.",
    "one, two, three, four, five.",
    "six, seven, eight, nine, ten.",
    "red, green, blue, yellow, white.",
    "monday, tuesday, wednesday, thursday, friday.",
    "the cat sleeps on the warm mat.",
    "the dog sleeps by the warm fire.",
    "we read a book in the morning.",
    "we walk to the park at noon.",
    "they eat bread and drink milk.",
    "they eat rice and drink tea.",
    "the river runs to the sea.",
    "the road runs to the town.",
    "a fish swims in the river.",
    "a frog sits on the log.",
    "the tree is tall and green.",
    "the sky is clear and blue.",
    "the snow is cold and white.",
    "the fire is hot and red.",
    "she opens the door and smiles.",
    "he closes the window and waits.",
    "the cat and the dog are friends.",
    "the bird and the fish are not friends.",
    "a b c d e f g h i j k l m.",
    "n o p q r s t u v w x y z.",
    "the train leaves at nine.",
    "the bus leaves at ten.",
    "the sun sets over the sea.",
    "the moon rises over the hill.",
    "the cat sat on the mat again.",
    "the dog ran to the gate again.",
)


@dataclass(frozen=True)
class Example:
    """One tokenized training sequence.

    Attributes:
        input_ids: ``[L]`` token ids, ``L <= seq_len``.
        labels: ``[L]`` the ids the loss is taken on, ``IGNORE_INDEX`` elsewhere (prompt tokens).
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


MAX_LINE_BYTES = 64 * 2**20  # a JSONL line longer than this is refused (a binary file, /dev/zero, ...)


class Records(list):
    """``read_jsonl``'s records: a list of dicts, with ``where[i]`` naming record ``i``'s ``FILE:LINE``."""

    where: list[str]


class Examples(list):
    """``encode_records``' examples: a list of ``Example``, with ``dropped`` naming the records left out."""

    dropped: list[str]


def read_records(path: str | os.PathLike) -> Records:
    """Read ``--data`` (or any data file) into records: a JSONL file, or a ``datasets`` directory / Parquet file(s).

    A directory or a ``.parquet`` path is read by ``fastpeft.app.dataset_files`` (rows named ``PATH[i]``), anything
    else as JSONL (``read_jsonl``). Rows take the same forms and rules as JSONL lines.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: as ``read_jsonl`` and ``dataset_files.iter_rows``, each naming the line or row.
    """
    if dataset_files.is_dataset_path(path):
        # An Arrow / Parquet schema gives every row every column: a null one is absent.
        rows = dataset_files.iter_rows(path)
        return _collect(((w, {k: v for k, v in r.items() if v is not None}) for w, r in rows), f"{path}: no rows")
    return read_jsonl(path)


def read_jsonl(path: str | os.PathLike) -> Records:
    """Read a JSONL data file into records ``{"text": ...}``, ``{"prompt": ..., "completion": ...}`` or
    ``{"messages": [...]}`` (``fastpeft.app.chat.check_messages``).

    Blank lines are skipped. The file is read a line at a time, each at most ``MAX_LINE_BYTES``. Chat records and
    text / prompt-completion records do not mix in one file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a directory; a line is too long, not UTF-8, holds a lone surrogate escape, or
            is not a JSON object of one of the forms (``FILE:LINE: reason``); the file mixes chat and other
            records; or it holds no records.
    """
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a JSONL file")
    return _collect(_jsonl_lines(path), f"{path}: no records (expected one JSON object a line)")


def _jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """``(FILE:LINE, object)`` for each non-blank line of a JSONL file."""
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            where = f"{path}:{lineno}"
            if len(raw) > MAX_LINE_BYTES:
                raise ValueError(f"{where}: line longer than {MAX_LINE_BYTES:,d} bytes (is this a JSONL file?)")
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise ValueError(f"{where}: JSON nested too deeply") from None


def _collect(rows: Iterable[tuple[str, Any]], empty: str) -> Records:
    """Validate ``(name, object)`` pairs into ``Records``, refusing a file that mixes chat and other records."""
    records = Records()
    records.where = []
    first: dict[bool, str] = {}  # is chat -> the first such record
    for where, obj in rows:
        record = check_record(where, obj)
        chat = "messages" in record
        first.setdefault(chat, where)
        if len(first) > 1:
            kind, other = ("a chat", "text / prompt-completion") if chat else ("a text / prompt-completion", "chat")
            raise ValueError(
                f"{where}: {kind} record among {other} records (the first at {first[not chat]}): "
                "one data file holds chat conversations or text / prompt-completion records, not both"
            )
        records.append(record)
        records.where.append(where)
    if not records:
        raise ValueError(empty)
    return records


def check_record(where: str, obj: Any) -> dict[str, Any]:
    """One record of a data file: ``{"text"}``, ``{"prompt", "completion"}`` or ``{"messages"}``; other keys ignored.

    Raises:
        ValueError: ``WHERE: reason``.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        both = [k for k in ("text", "completion") if k in obj]
        if both:
            raise ValueError(f"{where}: holds both 'messages' and {both[0]!r}: keep one form a record")
        return {"messages": chat.check_messages(where, obj["messages"])}
    if "text" in obj:
        keys: tuple[str, ...] = ("text",)
    elif "prompt" in obj and "completion" in obj:
        keys = ("prompt", "completion")
    else:
        raise ValueError(
            f"{where}: expected 'text', 'prompt' and 'completion', or 'messages'; got keys {sorted(obj)}"
        )
    for k in keys:
        if not isinstance(obj[k], str):
            raise ValueError(f"{where}: field {k!r} must be a string, got {type(obj[k]).__name__}")
        chat.check_text(where, f"field {k!r}", obj[k])
    return {k: obj[k] for k in keys}


def leading_ids(encode: Callable[[str], list[int]], text: str, n: int) -> list[int]:
    """The first ``n`` token ids of ``text`` (all of them if it has fewer), tokenizing only a prefix of a
    long text: a prefix long enough to hold more than ``n`` tokens is cut, and accepted once doubling it
    no longer changes its first ``n`` tokens (a cut only ever affects the tokens next to it)."""
    if n <= 0:
        return []
    size, previous = 8 * (n + 8), None
    while size < len(text):
        head = encode(text[:size])
        if len(head) > n + 8:
            if previous is not None and previous[:n] == head[:n]:
                return head[:n]
            previous = head
        size *= 2
    return encode(text)[:n]


def adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` itself puts its BOS in front of a text (its ``add_bos_token``, its post-processor)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_specials = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    return len(with_specials) > len(plain) and with_specials[0] == bos


def encode_records(records: Sequence[dict[str, str]], tokenizer: Any, seq_len: int) -> Examples:
    """Tokenize records into examples ``[bos] + prompt + completion + eos`` of at most ``seq_len`` tokens.

    The BOS only where the tokenizer adds one itself (``adds_bos``); a completion (or text) cut to fit keeps its
    EOS. A long text is cut to the tokens that fit before it is tokenized whole (``leading_ids``). A chat record is
    its template's rendering, labelled on the assistant turns (``chat.encode_conversation``), cut to ``seq_len``
    with an EOS where the cut falls inside an assistant turn. A record whose prompt (or first turns) leaves no
    label within ``seq_len`` is left out: counted in ``Examples.dropped`` (by ``FILE:LINE`` where ``records``
    came from ``read_records``, else ``record N``), the first named in a warning.

    Args:
        records: as ``read_records`` returns them.
        tokenizer: a transformers tokenizer (``bos_token_id`` / ``eos_token_id`` used when set).
        seq_len: the maximum sequence length (>= 2).

    Raises:
        ValueError: ``seq_len`` is too small, no example keeps a token to learn from, or a chat record cannot be
            rendered (``chat.encode_conversation``: no chat template, ...), naming it.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    examples = Examples()
    examples.dropped = []
    where = getattr(records, "where", None)
    for i, rec in enumerate(records):
        name = where[i] if where is not None else f"record {i + 1}"
        if "messages" in rec:
            input_ids, labels = _conversation(rec["messages"], tokenizer, seq_len, name)
        elif "text" in rec:
            prompt = bos
            room = seq_len - len(prompt) - len(eos)  # the EOS stays when the text is cut
            completion = leading_ids(ids, rec["text"], room) + eos if room >= 0 else eos
            input_ids, labels = (prompt + completion)[:seq_len], ([IGNORE_INDEX] * len(prompt) + completion)[:seq_len]
        else:
            prompt = bos + leading_ids(ids, rec["prompt"], seq_len - len(bos))
            room = seq_len - len(prompt) - len(eos)
            completion = leading_ids(ids, rec["completion"], room) + eos if room >= 0 else eos
            input_ids, labels = (prompt + completion)[:seq_len], ([IGNORE_INDEX] * len(prompt) + completion)[:seq_len]
        # The first label is never predicted (nothing precedes it); an example needs one more.
        if any(lab != IGNORE_INDEX for lab in labels[1:]):
            examples.append(Example(tuple(input_ids), tuple(labels)))
        else:
            examples.dropped.append(name)
    if not examples:
        raise ValueError(f"no example has a token to learn from within seq_len={seq_len}")
    if examples.dropped:
        _log.warning(
            "%d of %d examples dropped: nothing to learn within seq_len=%d (the prompt, or the turns before the "
            "first assistant answer, fill it), the first at %s; raise --seq-len or shorten the prompts",
            len(examples.dropped), len(records), seq_len, examples.dropped[0],
        )  # fmt: skip
    return examples


def _conversation(messages: list[dict[str, str]], tokenizer: Any, seq_len: int, where: str) -> tuple[list, list]:
    """A chat record's ``(input_ids, labels)`` within ``seq_len``: labels on the assistant turns only
    (``chat.encode_conversation``); an assistant turn cut by ``seq_len`` ends in the EOS, as a cut completion does."""
    ids, trained = chat.encode_conversation(messages, tokenizer, where)
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained, strict=True)]
    if len(ids) > seq_len:
        cut_inside = trained[seq_len - 1] and trained[seq_len]  # the turn goes on past the cut
        ids, labels = ids[:seq_len], labels[:seq_len]
        if cut_inside and tokenizer.eos_token_id is not None:
            ids[-1] = labels[-1] = tokenizer.eos_token_id
    return ids, labels


class Batches:
    """Right-padded batches of examples in a reproducible order.

    Epoch ``e`` visits the examples in the permutation drawn from ``torch.Generator`` seeded with
    ``seed + e``; batch ``i`` of the epoch holds positions ``[i * batch_size, (i + 1) * batch_size)``
    of it (the last batch may be short).

    Args:
        examples: the tokenized examples.
        batch_size: examples per batch.
        pad_id: the id padding positions get (they are masked out and carry no label).
        seed: the base seed of the shuffles.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed

    def _units(self) -> list:
        """What a batch is made of, in the order the shuffles permute: examples (rows, when packed)."""
        return self.examples

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self._units()) / self.batch_size)

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self._units()), generator=g).tolist()

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``labels``: each ``[B, L_max]`` int64."""
        width = max(len(ex.input_ids) for ex in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for row, ex in enumerate(examples):
            n = len(ex.input_ids)
            ids[row, :n] = torch.tensor(ex.input_ids)
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(ex.labels)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def iterate(self, epoch: int = 0, index: int = 0) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        """Yield ``(epoch, index, batch)`` forever, starting at batch ``index`` of ``epoch``."""
        units = self._units()
        while True:
            order = self._order(epoch)
            for i in range(index, self.batches_per_epoch):
                chunk = order[i * self.batch_size : (i + 1) * self.batch_size]
                yield epoch, i, self.collate([units[j] for j in chunk])
            epoch, index = epoch + 1, 0


def byte_tokenizer() -> Any:
    """A byte-level tokenizer built in memory: 4 special tokens then the 256 bytes (vocabulary 260).

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``<s>``, ``</s>``, ``<pad>``, ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    # its own rule, as a Llama tokenizer's: a BOS in front of every text it encodes with special tokens
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
