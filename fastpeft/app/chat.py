"""Chat data for ``fastpeft finetune``: ``{"messages": [{"role": ..., "content": ...}, ...]}`` records.

A conversation is rendered whole by the tokenizer's chat template (``tokenizer.apply_chat_template``) and
tokenized as transformers tokenizes a rendered chat: the text as the template writes it, no special token
added (the template writes its own BOS, none is prepended). The loss covers the assistant's turns only (TRL's
``assistant_only_loss``): each assistant turn's content and all the template writes after it up to the next
turn, the end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``, ``</s>``: the model learns where its answer
stops) and the whitespace after it, as TRL's training templates mark them; never the system, user and tool
turns nor the assistant header the generation prompt writes.

Which tokens those are:

- A template with ``{% generation %}`` blocks marks them itself: transformers'
  ``return_assistant_tokens_mask=True`` gives the mask (what TRL requires for ``assistant_only_loss``).
- Any other template is rendered turn by turn: assistant turn ``i`` spans the characters from the end of
  ``messages[:i]`` rendered with the generation prompt to the end of ``messages[:i + 1]`` rendered (or, where
  the template ends a last message otherwise, to where that text and the whole part); the tokens of the whole
  rendering that overlap those characters (a fast tokenizer's offsets) are trained, as transformers maps
  ``{% generation %}`` spans. That needs a template that writes each conversation's beginning as it writes the
  whole (the prefix with its generation prompt is the start of the whole text, and the turn's content follows);
  one that does not (a generation prompt that opens a ``<think>`` block, templates that rewrite earlier turns) is
  refused for the conversation, naming it, rather than guessed at. TRL ships ``{% generation %}`` versions of
  those templates (``trl/chat_templates/*_training.jinja``).

Roles are ``system``, ``user``, ``assistant`` and ``tool``; a ``tool`` turn only where the template names that
role. Messages hold ``role`` and ``content`` (a string) only: tool calls, images and other fields are refused.
"""

from __future__ import annotations

import os
import re
from typing import Any

__all__ = ["ROLES", "chat_template", "check_messages", "check_text", "encode_conversation"]

ROLES = ("system", "user", "assistant", "tool")

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_TOOL_ROLE = re.compile(r"""["']tool["']""")


def check_messages(where: str, messages: Any) -> list[dict[str, str]]:
    """Validate a record's ``messages`` field: a non-empty list of ``{"role", "content"}`` with an assistant turn.

    Keys whose value is null are ignored (a Parquet / Arrow schema lists every field in every message).

    Args:
        where: the record's name for messages (``FILE:LINE``).
        messages: the field's value as read.

    Returns:
        The messages as plain ``{"role": str, "content": str}`` dicts.

    Raises:
        ValueError: ``WHERE: reason`` for anything but such a list.
    """
    if not isinstance(messages, list):
        raise ValueError(f"{where}: field 'messages' must be a list of {{role, content}} objects, "
                         f"got {type(messages).__name__}")  # fmt: skip
    if not messages:
        raise ValueError(f"{where}: field 'messages' is an empty conversation")
    out = []
    for n, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: message {n} must be an object with 'role' and 'content', "
                             f"got {type(message).__name__}")  # fmt: skip
        message = {k: v for k, v in message.items() if v is not None}
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"{where}: message {n} has no {key!r}")
            if not isinstance(message[key], str):
                raise ValueError(f"{where}: message {n}: {key!r} must be a string, got {type(message[key]).__name__}")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: message {n} has role {message['role']!r}: expected one of {', '.join(ROLES)}")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise ValueError(f"{where}: message {n} has {extra}: only 'role' and 'content' are supported")
        check_text(where, f"message {n}: 'content'", message["content"])
        out.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: the conversation has no assistant turn: the loss covers only assistant turns, "
                         "so it would train nothing")  # fmt: skip
    return out


def check_text(where: str, what: str, text: str) -> None:
    """A JSON escape can spell a lone surrogate (``"\\ud800"``), which is no character: tokenizers fail on it.
    ``what`` names the field in the error (``field 'text'``, ``message 2: 'content'``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{where}: {what} holds a lone surrogate U+{ord(text[e.start]):04X} at character {e.start + 1} "
            "(an unpaired \\ud800-\\udfff escape: not text)"
        ) from None


def chat_template(tokenizer: Any, where: str) -> str:
    """The tokenizer's chat template text.

    Raises:
        ValueError: the tokenizer has none, naming ``where`` (the first conversation) and the fixes.
    """
    template = None
    if getattr(tokenizer, "chat_template", None):
        try:
            template = tokenizer.get_chat_template()
        except ValueError:
            template = None
    if not template:
        raise ValueError(
            f"{where}: a 'messages' conversation is rendered with the tokenizer's chat template, and this model's "
            "tokenizer has none: use a tokenizer that sets chat_template (tokenizer_config.json), or put the "
            "template in the model directory as chat_template.jinja"
        )
    return template


def encode_conversation(messages: list[dict[str, str]], tokenizer: Any, where: str) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation as its chat template renders it, and which of them the loss covers.

    Args:
        messages: as ``check_messages`` returns them.
        tokenizer: a transformers tokenizer with a chat template.
        where: the record's name for messages (``FILE:LINE``).

    Returns:
        ``(ids, trained)``: the ids of the whole rendering, and per id whether it belongs to an assistant turn.

    Raises:
        ValueError: ``WHERE: reason``: no chat template; a ``tool`` turn the template does not name; the template
            refuses the conversation; or (no ``{% generation %}`` blocks) it is not rendered turn by turn, opens with
            the assistant, or the tokenizer gives no character offsets.
    """
    template = chat_template(tokenizer, where)
    if any(m["role"] == "tool" for m in messages) and not _TOOL_ROLE.search(template):
        raise ValueError(f"{where}: a 'tool' turn, and this model's chat template has no tool role")
    from jinja2 import TemplateError

    try:
        if _GENERATION.search(template):
            out = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
        return _by_turns(messages, tokenizer, where)
    except TemplateError as e:
        raise ValueError(f"{where}: the chat template refuses this conversation ({e})") from None


def _by_turns(messages: list[dict[str, str]], tokenizer: Any, where: str) -> tuple[list[int], list[bool]]:
    """``encode_conversation`` for a template without ``{% generation %}`` blocks: the assistant turns' characters
    found by rendering each turn's prefix, mapped to the tokens of the whole rendering by their offsets."""

    def render(part: list[dict[str, str]], prompt: bool) -> str:
        return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=prompt)

    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{where}: finding the assistant tokens needs a fast tokenizer (character offsets), or a "
                         "chat template with {% generation %} blocks")  # fmt: skip
    full = render(messages, False)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    starts = [first for first, _ in enc["offset_mapping"]]
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError(f"{where}: the conversation opens with an assistant turn, which a chat template without "
                             "{% generation %} blocks cannot delimit: put a system or user turn before it")  # fmt: skip
        head, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if full.startswith(upto):
            end = len(upto)
        else:
            # A template may end its last message otherwise (an EOS after it, <|return|> for <|end|>): the turn
            # ends where the two texts' tokens part (characters could agree inside a token that differs).
            mine = tokenizer(upto, add_special_tokens=False)["input_ids"]
            same = len(os.path.commonprefix([mine, list(enc["input_ids"])]))
            end = starts[same] if same < len(starts) else len(full)
        if not (full.startswith(head) and message["content"].strip() in full[len(head) : end]):
            raise ValueError(
                f"{where}: the chat template does not render this conversation turn by turn (the text up to message "
                f"{i + 1} is not the start of the whole), so its assistant tokens cannot be told apart: use a template "
                "that marks them with {% generation %} blocks"
            )
        if end > len(head):
            spans.append((len(head), end))
    trained, at = [], 0
    for first, last in enc["offset_mapping"]:
        while at < len(spans) and first >= spans[at][1]:
            at += 1
        trained.append(at < len(spans) and last > spans[at][0])
    return list(enc["input_ids"]), trained
