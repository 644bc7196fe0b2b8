"""Records → chat messages → token ids with a loss mask. Pure Python, no Ray.

Shapes a corpus may have (one per dataset, detected or forced in config):
    text          {"text": ...}                                    every token trains
    instruction   {"instruction", "input"?, "output"}              only the output trains
    qa            {"question", "answer"}                           only the answer trains
    messages      {"messages": [{"role", "content"}, ...]}         only assistant turns train
                  (ShareGPT's {"conversations": [{"from", "value"}]} is accepted too)
"""

from __future__ import annotations

from collections.abc import Iterable

from jinja2 import TemplateError

IGNORE_INDEX = -100
SHAPES = ("text", "instruction", "qa", "messages")
ROLES = {"system": "system", "user": "user", "assistant": "assistant",
         "human": "user", "gpt": "assistant"}

# For tokenizers without a chat template (GPT-2): plain role-prefixed turns, each
# assistant turn closed by the end-of-text token so the model learns to stop.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ m['role'] | capitalize }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


class BadRecord(ValueError):
    """A record that cannot be trained on; `reason` is a short, countable label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def detect_shape(records: Iterable[dict]) -> str:
    """The shape most of the sample's records have (ties broken by SHAPES order)."""
    counts = dict.fromkeys(SHAPES, 0)
    for record in records:
        shape = _shape_of(record)
        if shape:
            counts[shape] += 1
    best = max(SHAPES, key=lambda s: counts[s])
    if counts[best] == 0:
        raise BadRecord("unknown_shape", f"no record has the fields of any shape ({', '.join(SHAPES)})")
    return best


def _shape_of(record: dict) -> str | None:
    if "messages" in record or "conversations" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "instruction"
    if "question" in record and "answer" in record:
        return "qa"
    if "text" in record:
        return "text"
    return None


def to_messages(record: dict, shape: str) -> list[dict] | str:
    """Chat messages for a record (a plain string for `text`); BadRecord when it cannot be."""
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", type(record).__name__)
    if shape == "text":
        return _text(record, "text")
    if shape == "instruction":
        prompt = _text(record, "instruction")
        extra = record.get("input")
        if extra is None:
            extra = ""
        if not isinstance(extra, str):
            raise BadRecord("bad_field", "input is not a string")
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record, "output")}]
    if shape == "qa":
        return [{"role": "user", "content": _text(record, "question")},
                {"role": "assistant", "content": _text(record, "answer")}]
    return _chat(record)


def _text(record: dict, field: str) -> str:
    if field not in record or record[field] is None:
        raise BadRecord("missing_field", field)
    value = record[field]
    if not isinstance(value, str):
        raise BadRecord("bad_field", f"{field} is not a string")
    if not value.strip():
        raise BadRecord("empty_text", field)
    return value


def _chat(record: dict) -> list[dict]:
    turns = record.get("messages", record.get("conversations"))
    if not isinstance(turns, list) or not turns:
        raise BadRecord("missing_field", "messages")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRecord("bad_field", "a message is not an object")
        role = ROLES.get(str(turn.get("role", turn.get("from", ""))).lower())
        if role is None:
            raise BadRecord("unknown_role", str(turn.get("role", turn.get("from"))))
        content = turn.get("content", turn.get("value"))
        if content is None:
            raise BadRecord("missing_field", "message content")
        if not isinstance(content, str):
            raise BadRecord("bad_field", "message content is not a string")
        if not content.strip():
            raise BadRecord("empty_text", "message content")
        messages.append({"role": role, "content": content})
    speakers = [m["role"] for m in messages if m["role"] != "system"]
    if speakers and speakers[0] == "assistant":
        raise BadRecord("assistant_first", "a chat must open with a user turn")
    if "assistant" not in speakers:
        raise BadRecord("no_answer", "no assistant message to train on")
    return messages


def render(tokenizer, messages: list[dict] | str) -> tuple[str, list[tuple[int, int]]]:
    """The text the model sees and the character spans whose tokens train.

    Chat: the tokenizer's chat template renders the conversation; each assistant turn's
    span is found by rendering the conversation up to that turn with and without it
    (templates render prefixes identically). Plain text trains on all of it plus EOS.
    """
    if isinstance(messages, str):
        text = messages + (tokenizer.eos_token or "")
        return text, [(0, len(text))]
    template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _apply(tokenizer, template, messages[:i], add_generation_prompt=True)
        upto = _apply(tokenizer, template, messages[: i + 1], add_generation_prompt=False)
        if not upto.startswith(prompt):
            raise BadRecord("template_mismatch", "chat template does not render prefixes stably")
        spans.append((len(prompt), len(upto)))
    return _apply(tokenizer, template, messages, add_generation_prompt=False), spans


def _apply(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as err:  # e.g. a template that insists roles alternate
        raise BadRecord("template_error", str(err)) from None


def tokenize(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids and labels: a token's label is its id when its characters overlap a
    trainable span (byte-level BPE folds the space before an answer into its first
    token), else IGNORE_INDEX."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if any(start < hi and end > lo for lo, hi in spans) else IGNORE_INDEX
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    return encoded["input_ids"], labels
