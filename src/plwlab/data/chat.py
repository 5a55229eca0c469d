"""Chat conversations -> token ids with a segment id per token, through the model's own chat template.

Sources: ``messages`` records (``[{"role", "content"}, ...]``) or ShareGPT-style ``conversations``
(``[{"from": "human" | "gpt" | "system", "value"}]``, with an optional top-level ``system``), from a local
``.json`` / ``.jsonl`` / ``.parquet`` file or an HF hub dataset id, keys and role names mappable. A malformed conversation (unknown role, empty content, no assistant turn, turns that do
not alternate) raises :class:`ChatDataError` naming the record, or is skipped and counted (``on_invalid="skip"``).

Segments (:data:`plwlab.data.segments.SEGMENTS`): the text of system, user and assistant turns, a reasoning span inside
an assistant turn (between ``think_tags``), and the template's own tokens (role headers, BOS, separators); assistant
turns before the last are ``earlier_assistant`` / ``earlier_reasoning``. The tokens that close an assistant turn
(its end-of-turn marker) belong to the assistant: a model must learn to stop. Each token's
segment is found exactly: the conversation is rendered once, each turn's end is where the rendering of the
conversation up to that turn ends (checked to be a token prefix of the whole; a template for which it is not is
named in the error), and inside a turn the content's characters are located in the rendered text.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from plwlab.data.segments import SEGMENT_ID
from plwlab.data.sources import DataError, read_rows

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # HF's marker of the assistant's tokens in a template
# ChatML as TRL's setup_chat_format gives a base model (its two tokens added as special tokens), BOS first if any
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # fmt: skip
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class ChatDataError(DataError):
    """A conversation file or record that cannot be used, named."""


@dataclass
class ChatExample:
    input_ids: list[int]
    segment_ids: list[int]  # one of plwlab.data.segments.SEGMENT_ID per token
    turn_ids: list[int]  # index of the message each token belongs to (-1: template tokens outside any turn)


FORMAT_KEYS = {"messages": {"messages": "messages", "role": "role", "content": "content", "system": "system"},
               "sharegpt": {"messages": "conversations", "role": "from", "content": "value", "system": "system"}}


def to_messages(record: Any, index: int, fmt: str = "messages", columns: dict[str, str] | None = None,
                roles: dict[str, str] | None = None) -> list[dict[str, str]]:  # fmt: skip
    """One record as ``[{"role", "content"}]``; raises naming the record.

    ``fmt``: ``messages`` (a ``messages`` list of ``role``/``content``) or ``sharegpt`` (a ``conversations`` list of
    ``from``/``value``, roles human/gpt/system). ``columns`` renames those keys (``messages``, ``role``,
    ``content``, and ``system``: an optional top-level system prompt); ``roles`` maps the dataset's role names
    to system/user/assistant on top of the format's own.
    """
    name = f"record {index}" + (f" (id {record['id']!r})" if isinstance(record, dict) and "id" in record else "")
    if not isinstance(record, dict):
        raise ChatDataError(f"{name} is a {type(record).__name__}, not an object")
    keys = {**FORMAT_KEYS[fmt], **(columns or {})}
    role_names = {**({r: r for r in ROLES} if fmt == "messages" else SHAREGPT_ROLES), **(roles or {})}
    turns = record.get(keys["messages"])
    if not isinstance(turns, list) or not turns:
        raise ChatDataError(f"{name} has no {keys['messages']!r} list")
    messages = []
    if record.get(keys["system"]):
        messages.append({"role": "system", "content": record[keys["system"]]})
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ChatDataError(f"{name} turn {t} is a {type(turn).__name__}, not an object")
        role = role_names.get(turn.get(keys["role"]))
        if role not in ROLES:
            raise ChatDataError(f"{name} turn {t} has unknown role {turn.get(keys['role'])!r}")
        content = turn.get(keys["content"])
        if not isinstance(content, str) or not content.strip():
            raise ChatDataError(f"{name} turn {t} ({role}) has empty content")
        messages.append({"role": role, "content": content})
    problem = _alternation_problem(messages)
    if problem:
        raise ChatDataError(f"{name}: {problem}")
    return messages


def _alternation_problem(messages: Sequence[dict[str, str]]) -> str | None:
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        return "a system turn after the first turn"
    if "assistant" not in body:
        return "no assistant turn"
    if body[0] != "user":
        return f"the first turn after the system prompt is {body[0]!r}, not 'user'"
    for a, b in zip(body, body[1:]):
        if a == b:
            return f"two {a!r} turns in a row (turns must alternate user/assistant)"
    return None


def load_conversations(path: str | Path, fmt: str = "messages", on_invalid: str = "error", split: str = "train",
                       columns: dict[str, str] | None = None, roles: dict[str, str] | None = None,
                       ) -> list[list[dict[str, str]]]:  # fmt: skip
    """Conversations from a local ``.json`` / ``.jsonl`` / ``.parquet`` file or an HF hub dataset id, in ``fmt``
    (``messages`` or ``sharegpt``; ``columns`` and ``roles`` as in :func:`to_messages`)."""
    out, skipped = [], []
    for i, record in enumerate(read_rows(str(path), split)):
        try:
            out.append(to_messages(record, i, fmt, columns, roles))
        except ChatDataError as e:
            if on_invalid == "error":
                raise ChatDataError(f"{path}: {e}") from None
            skipped.append(str(e))
    if skipped:
        log.warning("%s: skipped %d invalid conversations, e.g. %s", path, len(skipped), "; ".join(skipped[:3]))
    if not out:
        raise ChatDataError(f"{path}: no usable conversations ({len(skipped)} invalid)")
    return out


def set_chat_template(tokenizer: Any, chat_template: str) -> None:
    """Give ``tokenizer`` a chat template: ``chatml`` (ChatML, as TRL's ``setup_chat_format``: its tokens added as
    special tokens, BOS first when the tokenizer has one), a ``.jinja`` file, or a Jinja template string."""
    if chat_template == "chatml":
        tokenizer.add_special_tokens({"additional_special_tokens": list(CHATML_TOKENS)})
        tokenizer.chat_template = ("{{ bos_token }}" if tokenizer.bos_token else "") + CHATML
    elif chat_template.endswith(".jinja"):
        path = Path(chat_template).expanduser()
        if not path.is_file():
            raise ChatDataError(f"chat template file not found: {chat_template}")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    else:
        tokenizer.chat_template = chat_template


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn under the tokenizer's chat template (generation stops at any of them):
    EOS and the template's end-of-turn marker (ChatML's ``<|im_end|>``, Llama-3's ``<|eot_id|>``, ...)."""
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    ids = tokenizer(render_chat(tokenizer, messages, False), add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    y = tokenizer("y", add_special_tokens=False)["input_ids"]
    after = next((ids[i + len(y) :] for i in range(len(ids) - len(y), -1, -1) if ids[i : i + len(y)] == y), [])
    marker = next((t for t in after if t in special), None)
    return list(dict.fromkeys(t for t in (tokenizer.eos_token_id, marker) if t is not None))


def render_chat(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    """``messages`` as text through the tokenizer's chat template (with the assistant's opening when
    ``generation_prompt``): how training renders a conversation and evaluation prompts a chat run."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def tokenize_conversation(tokenizer: Any, messages: Sequence[dict[str, str]], think_tags: tuple[str, str] | None = None,
                          name: str = "conversation") -> ChatExample:  # fmt: skip
    """Token ids of ``messages`` rendered by ``tokenizer``'s chat template, with each token's segment and turn.

    Turn boundaries: the rendering of ``messages[:k+1]`` must be a token prefix of the whole; a template that
    re-renders earlier turns differently raises, naming ``name``. Inside a turn, tokens overlapping the content's
    characters take the turn's role (a ``think_tags`` span inside an assistant turn: ``reasoning``); the tokens
    before the content are the template's; those after it close the turn: the assistant's for an assistant turn,
    else the template's. A template that marks assistant tokens itself (``{% generation %}``) decides which tokens
    of an assistant turn are the assistant's.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatDataError("the tokenizer has no chat template (set model.chat_template or use a chat model's tokenizer)")
    try:
        text = render_chat(tokenizer, messages, False)
    except TemplateError as e:  # e.g. Mistral's raise_exception on a system turn
        raise ChatDataError(f"{name}: the chat template refuses it: {e}") from None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]

    def prefix_length(prefix_text: str, what: str) -> int:
        if not text.startswith(prefix_text):
            raise ChatDataError(f"{name}: the chat template renders {what} differently inside the whole conversation, "
                                "so token segments cannot be found exactly")  # fmt: skip
        prefix_ids = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
        if ids[: len(prefix_ids)] != prefix_ids:
            raise ChatDataError(f"{name}: {what} is not a token prefix of the whole conversation (a token merges "
                                "across the turn boundary), so token segments cannot be found exactly")  # fmt: skip
        return len(prefix_ids)

    marked = None
    if GENERATION_TAG.search(tokenizer.chat_template):
        out = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)  # fmt: skip
        if list(out["input_ids"]) != list(ids):
            raise ChatDataError(f"{name}: the template's assistant mask is for other tokens than its rendered text's")
        marked = list(out["assistant_masks"])
    segment = [SEGMENT_ID["template"]] * len(ids)
    turn = [-1] * len(ids)
    last_assistant = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
    start_char, start_tok = 0, 0
    for k, message in enumerate(messages):
        end_text = render_chat(tokenizer, messages[: k + 1], False)
        end_tok = prefix_length(end_text, f"the conversation up to turn {k}")
        content = message["content"]
        content_at = text.find(content, start_char, len(end_text))
        if content_at < 0:  # templates often trim it
            content = content.strip()
            content_at = text.find(content, start_char, len(end_text))
        if content_at < 0:
            raise ChatDataError(f"{name}: turn {k}'s content is not in its rendering (the template rewrites it)")
        content_end = content_at + len(content)
        earlier = "earlier_" if message["role"] == "assistant" and k < last_assistant else ""
        spans = []
        if message["role"] == "assistant" and think_tags:
            open_tag, close_tag = think_tags
            o = text.find(open_tag, content_at, content_end)
            c = text.find(close_tag, o + len(open_tag), content_end) if o >= 0 else -1
            if o >= 0 and c >= 0:
                spans.append((o, c + len(close_tag), SEGMENT_ID[f"{earlier}reasoning"]))
        role_id = SEGMENT_ID[earlier + message["role"]]
        for t in range(start_tok, end_tok):
            lo, hi = offsets[t]
            turn[t] = k
            if marked is not None and message["role"] == "assistant":
                mine = bool(marked[t])
            else:  # content, or after it the tokens that close an assistant turn; before it, the turn's header
                mine = hi > content_at and (lo < content_end or message["role"] == "assistant")
            if mine:
                segment[t] = next((s for a, b, s in spans if lo < b and hi > a), role_id)
        start_char, start_tok = len(end_text), end_tok
    return ChatExample(ids, segment, turn)
