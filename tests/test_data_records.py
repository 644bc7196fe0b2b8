"""records.py: record shapes → chat messages → rendered text → token ids with a loss mask.

Every layout test runs against both tokenizers the project ships:
  * SmolLM2 (ChatML chat template, which adds a default system turn when none is given);
  * GPT-2 (no chat template → FALLBACK_CHAT_TEMPLATE, "Role: content" lines).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from transformers import AutoTokenizer

from raymed.assets import resolve_pretrained
from raymed.data.records import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    BadRecord,
    detect_shape,
    render,
    to_messages,
    tokenize,
)

SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


# ---------------------------------------------------------------- dialects (one per tokenizer)


@dataclass
class Dialect:
    """A tokenizer and what its chat layout is expected to look like."""

    name: str
    tokenizer: object

    @property
    def chatml(self) -> bool:
        return self.name == "smollm2"

    @property
    def eos(self) -> str:
        return self.tokenizer.eos_token

    def expected_text(self, messages: list[dict]) -> str:
        """The rendered conversation, written out by hand from the template's rules."""
        if self.chatml:
            out = "" if messages[0]["role"] == "system" else f"<|im_start|>system\n{SMOL_DEFAULT_SYSTEM}<|im_end|>\n"
            return out + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return "".join(
            f"{m['role'].capitalize()}: {m['content']}" + (self.eos if m["role"] == "assistant" else "") + "\n"
            for m in messages
        )

    def answer_span_text(self, answer: str) -> str:
        """The characters of the rendered text that train for one assistant turn."""
        return f"{answer}{self.eos}\n"

    def answer_labels_text(self, answer: str) -> str:
        """The decoded labelled tokens of one assistant turn. GPT-2's byte-level BPE folds the
        space after "Assistant:" into the answer's first token, so that space trains too."""
        return ("" if self.chatml else " ") + self.answer_span_text(answer)

    def answer_first_token(self, answer: str) -> int:
        """The id of the answer's first token, as the answer tokenizes on its own (after
        GPT-2's folded space)."""
        prefix = "" if self.chatml else " "
        return self.tokenizer(prefix + answer, add_special_tokens=False)["input_ids"][0]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(resolve_pretrained("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return AutoTokenizer.from_pretrained(resolve_pretrained("gpt2"))


@pytest.fixture(params=["smollm2", "gpt2"])
def dialect(request, smollm2_tokenizer, gpt2_tokenizer) -> Dialect:
    tokenizer = {"smollm2": smollm2_tokenizer, "gpt2": gpt2_tokenizer}[request.param]
    return Dialect(request.param, tokenizer)


# ---------------------------------------------------------------- helpers


@dataclass
class Encoded:
    text: str
    spans: list[tuple[int, int]]
    ids: list[int]
    labels: list[int]


def encode(dialect: Dialect, record: dict, shape: str) -> Encoded:
    text, spans = render(dialect.tokenizer, to_messages(record, shape))
    ids, labels = tokenize(dialect.tokenizer, text, spans)
    return Encoded(text, spans, ids, labels)


def decode(dialect: Dialect, ids: list[int]) -> str:
    return dialect.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def labelled_runs(enc: Encoded) -> list[list[int]]:
    """Maximal runs of consecutive trained tokens (one per assistant turn, for chats)."""
    runs, current = [], []
    for token, label in zip(enc.ids, enc.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(token)
    if current:
        runs.append(current)
    return runs


def first_labelled_index(enc: Encoded) -> int:
    return next(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)


def assert_labels_are_ids_or_ignored(enc: Encoded) -> None:
    assert len(enc.labels) == len(enc.ids)
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(enc.ids, enc.labels))


def assert_single_answer_layout(dialect: Dialect, record: dict, shape: str, messages: list[dict]) -> None:
    """One prompt, one answer: rendered text, spans, labels and the mask boundary."""
    answer = messages[-1]["content"]
    enc = encode(dialect, record, shape)

    assert enc.text == dialect.expected_text(messages)
    assert decode(dialect, enc.ids) == enc.text
    assert [enc.text[lo:hi] for lo, hi in enc.spans] == [dialect.answer_span_text(answer)]
    assert_labels_are_ids_or_ignored(enc)

    runs = labelled_runs(enc)
    assert [decode(dialect, run) for run in runs] == [dialect.answer_labels_text(answer)]

    # The mask covers exactly the prompt: everything before the first trained token is
    # prompt (system, user, role headers), and the first trained token starts the answer.
    first = first_labelled_index(enc)
    assert enc.ids[first] == dialect.answer_first_token(answer)
    prompt = enc.text[: enc.spans[0][0]]
    assert decode(dialect, enc.ids[:first]) == (prompt if dialect.chatml else prompt.removesuffix(" "))
    assert all(label == IGNORE_INDEX for label in enc.labels[:first])
    assert all(label != IGNORE_INDEX for label in enc.labels[first:])  # answer runs to the end


# ---------------------------------------------------------------- shapes → layout, both tokenizers


def test_text_shape_trains_on_every_token_and_ends_with_eos(dialect):
    record = {"text": "Aspirin irreversibly inhibits cyclooxygenase."}
    assert to_messages(record, "text") == record["text"]
    enc = encode(dialect, record, "text")

    assert enc.text == record["text"] + dialect.eos
    assert enc.spans == [(0, len(enc.text))]
    assert decode(dialect, enc.ids) == enc.text
    assert enc.labels == enc.ids
    assert enc.ids[-1] == dialect.tokenizer.eos_token_id


def test_instruction_without_input_trains_only_the_output(dialect):
    record = {"instruction": "Name the first-line drug for anaphylaxis.", "output": "Epinephrine, given intramuscularly."}
    messages = [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": record["output"]}]
    assert to_messages(record, "instruction") == messages
    assert_single_answer_layout(dialect, record, "instruction", messages)


def test_instruction_with_input_puts_input_after_a_blank_line(dialect):
    record = {
        "instruction": "Classify the blood pressure reading.",
        "input": "152/95 mmHg",
        "output": "Stage 2 hypertension.",
    }
    messages = [
        {"role": "user", "content": "Classify the blood pressure reading.\n\n152/95 mmHg"},
        {"role": "assistant", "content": "Stage 2 hypertension."},
    ]
    assert to_messages(record, "instruction") == messages
    assert_single_answer_layout(dialect, record, "instruction", messages)


@pytest.mark.parametrize("blank_input", ["", "   \n", None])
def test_instruction_with_blank_input_ignores_it(blank_input):
    record = {"instruction": "Define tachycardia.", "input": blank_input, "output": "A heart rate above 100."}
    assert to_messages(record, "instruction")[0] == {"role": "user", "content": "Define tachycardia."}


def test_qa_trains_only_the_answer(dialect):
    record = {"question": "Which vitamin deficiency causes scurvy?", "answer": "Vitamin C deficiency causes scurvy."}
    messages = [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["answer"]}]
    assert to_messages(record, "qa") == messages
    assert_single_answer_layout(dialect, record, "qa", messages)


MULTI_TURN = [
    {"role": "system", "content": "You are a careful clinician."},
    {"role": "user", "content": "What is a normal resting heart rate?"},
    {"role": "assistant", "content": "Between 60 and 100 beats per minute."},
    {"role": "user", "content": "And in trained athletes?"},
    {"role": "assistant", "content": "Often 40 to 60 beats per minute."},
]

SHAREGPT = {
    "conversations": [
        {"from": "human", "value": "What does BMI stand for?"},
        {"from": "gpt", "value": "Body mass index."},
        {"from": "human", "value": "How is it computed?"},
        {"from": "gpt", "value": "Weight in kilograms divided by height in metres squared."},
    ]
}
SHAREGPT_MESSAGES = [
    {"role": "user", "content": "What does BMI stand for?"},
    {"role": "assistant", "content": "Body mass index."},
    {"role": "user", "content": "How is it computed?"},
    {"role": "assistant", "content": "Weight in kilograms divided by height in metres squared."},
]


def assert_chat_layout(dialect: Dialect, enc: Encoded, messages: list[dict]) -> None:
    """Every assistant turn trains (one labelled run each, in order); no other turn does."""
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    prompts = [m["content"] for m in messages if m["role"] != "assistant"]

    assert enc.text == dialect.expected_text(messages)
    assert decode(dialect, enc.ids) == enc.text
    assert [enc.text[lo:hi] for lo, hi in enc.spans] == [dialect.answer_span_text(a) for a in answers]
    assert_labels_are_ids_or_ignored(enc)

    runs = labelled_runs(enc)
    assert [decode(dialect, run) for run in runs] == [dialect.answer_labels_text(a) for a in answers]
    trained_text = "".join(decode(dialect, run) for run in runs)
    for prompt in prompts:
        assert prompt not in trained_text
    # Role headers never train.
    for header in ("user", "system", "assistant", "User:", "System:", "Assistant:"):
        assert header not in trained_text

    first = first_labelled_index(enc)
    assert enc.ids[first] == dialect.answer_first_token(answers[0])


def test_messages_with_system_and_two_assistant_turns(dialect):
    record = {"messages": MULTI_TURN}
    assert to_messages(record, "messages") == MULTI_TURN
    enc = encode(dialect, record, "messages")
    assert_chat_layout(dialect, enc, MULTI_TURN)
    if dialect.chatml:  # an explicit system turn replaces the template's default one
        assert SMOL_DEFAULT_SYSTEM not in enc.text


def test_sharegpt_conversations_map_human_and_gpt_roles(dialect):
    assert to_messages(SHAREGPT, "messages") == SHAREGPT_MESSAGES
    enc = encode(dialect, SHAREGPT, "messages")
    assert_chat_layout(dialect, enc, SHAREGPT_MESSAGES)


def test_roles_are_case_insensitive():
    record = {"messages": [{"role": "User", "content": "Hi"}, {"from": "GPT", "value": "Hello"}]}
    assert [m["role"] for m in to_messages(record, "messages")] == ["user", "assistant"]


def test_gpt2_uses_the_fallback_template_and_smollm2_its_own(smollm2_tokenizer, gpt2_tokenizer):
    assert gpt2_tokenizer.chat_template is None
    assert smollm2_tokenizer.chat_template and smollm2_tokenizer.chat_template != FALLBACK_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert render(gpt2_tokenizer, messages)[0] == "User: Q\nAssistant: A<|endoftext|>\n"
    assert render(smollm2_tokenizer, messages)[0].endswith("<|im_start|>assistant\nA<|im_end|>\n")


def test_tokenize_without_spans_trains_nothing(gpt2_tokenizer):
    ids, labels = tokenize(gpt2_tokenizer, "No answer here.", [])
    assert ids and labels == [IGNORE_INDEX] * len(ids)


def test_tokenize_labels_tokens_overlapping_a_span(gpt2_tokenizer):
    text = "alpha beta gamma"
    ids, labels = tokenize(gpt2_tokenizer, text, [(text.index("beta"), text.index(" gamma"))])
    tokens = [gpt2_tokenizer.decode([i]) for i in ids]
    assert tokens == ["alpha", " beta", " gamma"]
    assert labels == [IGNORE_INDEX, ids[1], IGNORE_INDEX]


# ---------------------------------------------------------------- detect_shape


@pytest.mark.parametrize(
    "record, shape",
    [
        ({"text": "x"}, "text"),
        ({"instruction": "x", "output": "y"}, "instruction"),
        ({"instruction": "x", "input": "z", "output": "y"}, "instruction"),
        ({"question": "x", "answer": "y"}, "qa"),
        ({"messages": []}, "messages"),
        ({"conversations": []}, "messages"),
        ({"messages": [], "text": "x"}, "messages"),  # chat fields win over text
        ({"instruction": "x", "text": "y"}, "text"),  # instruction needs its output
    ],
)
def test_detect_shape_of_a_single_record(record, shape):
    assert detect_shape([record]) == shape


def test_detect_shape_picks_the_majority():
    records = [{"question": "q", "answer": "a"}] * 3 + [{"text": "t"}] * 2 + [{"messages": []}]
    assert detect_shape(records) == "qa"
    assert detect_shape(iter(records)) == "qa"  # any iterable, e.g. a generator


def test_detect_shape_ignores_unknown_records():
    records = [{"foo": 1}, {"bar": 2}, {"instruction": "i", "output": "o"}, {"baz": 3}]
    assert detect_shape(records) == "instruction"


def test_detect_shape_breaks_ties_in_shapes_order():
    assert detect_shape([{"messages": []}, {"text": "t"}]) == "text"
    assert detect_shape([{"question": "q", "answer": "a"}, {"instruction": "i", "output": "o"}]) == "instruction"


@pytest.mark.parametrize("records", [[], [{"foo": 1}, {"prompt": "p", "completion": "c"}]])
def test_detect_shape_with_no_known_record_raises_unknown_shape(records):
    with pytest.raises(BadRecord) as err:
        detect_shape(records)
    assert err.value.reason == "unknown_shape"


# ---------------------------------------------------------------- bad records


@pytest.mark.parametrize(
    "record, shape, reason",
    [
        # missing field
        ({"body": "x"}, "text", "missing_field"),
        ({"text": None}, "text", "missing_field"),
        ({"instruction": "x"}, "instruction", "missing_field"),
        ({"output": "y"}, "instruction", "missing_field"),
        ({"question": "x"}, "qa", "missing_field"),
        ({"answer": "y"}, "qa", "missing_field"),
        ({"text": "x"}, "messages", "missing_field"),
        ({"messages": []}, "messages", "missing_field"),
        # empty or whitespace-only text
        ({"text": ""}, "text", "empty_text"),
        ({"text": " \n\t "}, "text", "empty_text"),
        ({"instruction": "x", "output": "   "}, "instruction", "empty_text"),
        ({"question": "", "answer": "y"}, "qa", "empty_text"),
        ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]}, "messages", "empty_text"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}, "messages", "empty_text"),
        # non-string field
        ({"text": 42}, "text", "bad_field"),
        ({"text": ["a", "b"]}, "text", "bad_field"),
        ({"instruction": "x", "output": {"a": 1}}, "instruction", "bad_field"),
        ({"instruction": "x", "input": 5, "output": "y"}, "instruction", "bad_field"),
        ({"question": 1.5, "answer": "y"}, "qa", "bad_field"),
        ({"messages": ["hello"]}, "messages", "bad_field"),
        # unknown role
        ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}]}, "messages", "unknown_role"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "messages", "unknown_role"),
        ({"messages": [{"content": "no role"}, {"role": "assistant", "content": "a"}]}, "messages", "unknown_role"),
        # a chat with nothing to train on
        ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}, "messages", "no_answer"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "messages", "no_answer"),
    ],
)
def test_bad_record_reason(record, shape, reason):
    with pytest.raises(BadRecord) as err:
        to_messages(record, shape)
    assert err.value.reason == reason


@pytest.mark.parametrize("shape", ["text", "instruction", "qa", "messages"])
@pytest.mark.parametrize("record", ["just a string", ["a", "list"], 7, None])
def test_non_object_record_is_not_an_object(record, shape):
    with pytest.raises(BadRecord) as err:
        to_messages(record, shape)
    assert err.value.reason == "not_an_object"


def test_bad_record_is_a_value_error_carrying_reason_and_detail():
    err = BadRecord("missing_field", "text")
    assert isinstance(err, ValueError)
    assert err.reason == "missing_field"
    assert str(err) == "missing_field: text"
    assert str(BadRecord("no_answer")) == "no_answer"


# ---------------------------------------------------------------- turn order and content types


def test_chat_opening_with_assistant_turn_is_a_bad_record():
    record = {"conversations": [{"from": "gpt", "value": "How can I help?"}, {"from": "human", "value": "Hi"}]}
    with pytest.raises(BadRecord) as err:
        to_messages(record, "messages")
    assert err.value.reason == "assistant_first"


@pytest.mark.parametrize(
    ("message", "reason"),
    [({"role": "user", "content": 123}, "bad_field"), ({"role": "user"}, "missing_field")],
)
def test_message_content_must_be_a_string(message, reason):
    record = {"messages": [message, {"role": "assistant", "content": "a"}]}
    with pytest.raises(BadRecord) as err:
        to_messages(record, "messages")
    assert err.value.reason == reason


@pytest.mark.parametrize("falsy", [0, False, [], {}])
def test_instruction_input_must_be_a_string_even_when_falsy(falsy):
    record = {"instruction": "Define fever.", "input": falsy, "output": "A raised temperature."}
    with pytest.raises(BadRecord) as err:
        to_messages(record, "instruction")
    assert err.value.reason == "bad_field"
