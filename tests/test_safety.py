"""The safety layer without Ray: the red-flag check on the labelled prompts, negations,
the banner and disclaimer, and redaction of personal identifiers (in text and in logs)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from raymed.serve import errors
from raymed.serve.safety import (
    DISCLAIMER,
    SYSTEM_PROMPT,
    RedactingFilter,
    banner,
    check,
    redact,
    safety_field,
    with_system_prompt,
)

ROOT = Path(__file__).resolve().parent.parent
CASES = [json.loads(line) for line in (ROOT / "tests" / "data" / "safety_prompts.jsonl").read_text().splitlines()]
RED_FLAGS = [c for c in CASES if c["red_flag"]]
BENIGN = [c for c in CASES if not c["red_flag"]]


def test_the_labelled_set_is_big_enough():
    assert len(RED_FLAGS) >= 30 and len(BENIGN) >= 30
    assert {c["category"] for c in RED_FLAGS} >= {"chest_pain", "stroke", "anaphylaxis", "suicidal_intent",
                                                  "severe_bleeding"}


@pytest.mark.parametrize("case", RED_FLAGS, ids=lambda c: c["text"][:40])
def test_every_red_flag_prompt_is_caught_in_its_category(case):
    assert case["category"] in check([case["text"]]).categories


def test_the_bench_reports_full_recall_and_the_false_alarm_rate():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "safety_eval.py")], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)}).stdout
    report = json.loads(out)
    assert report["recall"] == 1.0 and report["missed"] == []
    assert report["false_alarm_rate"] == len(report["false_alarms"]) / len(BENIGN)
    assert report["false_alarm_rate"] < 0.2


@pytest.mark.parametrize("text", [
    "no chest pain or shortness of breath",
    "I have chest pain but no shortness of breath when I press on my ribs",
    "Denies chest pain; breathing normally",
    "never had suicidal thoughts",
    "no swelling of the lips or throat",
])
def test_negated_symptoms_are_not_red_flags(text):
    assert not check([text]).red_flag


def test_a_negation_in_another_clause_does_not_hide_a_red_flag():
    assert check(["No fever. But I have crushing chest pain and I can't breathe"]).red_flag
    assert check(["I'm not sure what's happening but my face is drooping"]).categories == ("stroke",)


def test_a_red_flag_in_an_earlier_user_message_still_counts():
    assert check(["my throat is closing after eating nuts", "what should I do?"]).categories == ("anaphylaxis",)


def test_banner_and_safety_field():
    flagged = check(["I want to end my life"])
    assert banner(flagged).startswith("\u26a0 Possible emergency.") and "988" in banner(flagged)
    assert safety_field(flagged) == {"red_flag": True, "categories": ["suicidal_intent"], "banner": banner(flagged),
                                     "disclaimer": DISCLAIMER}
    calm = check(["What is a fever?"])
    assert banner(calm) == "" and safety_field(calm) == {"red_flag": False, "categories": [], "banner": None,
                                                         "disclaimer": DISCLAIMER}


def test_the_system_prompt_leads_and_a_callers_system_message_is_merged_after_it():
    user = {"role": "user", "content": "Hi"}
    assert with_system_prompt([user]) == [{"role": "system", "content": SYSTEM_PROMPT}, user]
    merged = with_system_prompt([{"role": "system", "content": "Be brief."}, user])
    assert merged == [{"role": "system", "content": f"{SYSTEM_PROMPT}\n\nBe brief."}, user]


IDENTIFIERS = {
    "name": ("My name is Johanna Quistorp", "Quistorp"),
    "titled name": ("Dr. Anselm Vierbuchen referred me", "Vierbuchen"),
    "patient is": ("the patient is Anselm Vierbuchen", "Vierbuchen"),
    "i'm": ("Hello, I'm Anselm and my chest hurts", "Anselm"),
    "mrn": ("MRN: 84736251", "84736251"),
    "mrn compact": ("record MRN-9912873", "9912873"),
    "phone": ("call me on +1 (415) 555-0199", "555-0199"),
    "phone dashes": ("or 020-7946-0321", "7946"),
    "dob slashes": ("born 03/14/1979", "03/14/1979"),
    "dob iso": ("DOB 1979-03-14", "1979-03-14"),
    "dob words": ("born on 14 March 1979", "March 1979"),
    "email": ("write to jq.quistorp+med@example.org", "example.org"),
}


@pytest.mark.parametrize("key", IDENTIFIERS)
def test_redact_removes_each_kind_of_identifier(key):
    text, secret = IDENTIFIERS[key]
    assert secret not in redact(text)


def test_redact_keeps_what_logs_need():
    line = ("request chatcmpl-0123456789abcdef01234567 chat: prompt_tokens=412 max_tokens=16 ttft_s=0.125 "
            "from 10.100.200.31:8000 (ray 2.60.0)")
    assert redact(line) == line


def test_the_log_filter_redacts_messages_arguments_and_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("raymed.test_safety")
    logger.addHandler(handler)
    try:
        logger.warning("patient %s, email %s", "Patient Johanna Quistorp", "jq@example.org")
        try:
            raise ValueError("bad DOB 03/14/1979")
        except ValueError:
            logger.exception("failed for MRN 84736251")
    finally:
        logger.removeHandler(handler)
    logged = stream.getvalue()
    assert "ValueError" in logged and "[EMAIL]" in logged
    for secret in ("Quistorp", "jq@example.org", "03/14/1979", "84736251"):
        assert secret not in logged


def test_error_messages_never_echo_identifiers():
    error = errors.model_not_found("jq.quistorp@example.org", "tiny")
    assert "example.org" not in json.dumps(error.body())
