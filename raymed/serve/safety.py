"""The medical safety layer, applied by the Gateway outside the model.

- `SYSTEM_PROMPT` leads every chat (the model is told what it is and is not).
- `check` is a deterministic red-flag detector (regular expressions with negation
  handling, no model): a match leads the answer with emergency guidance (`banner`) and
  marks the response (`safety_field`). The banner is added by the Gateway, not written by
  the model, so no prompt can talk it away.
- `DISCLAIMER` goes into every answer's metadata (`safety.disclaimer`).
- `redact` strips personal identifiers (names, MRNs, phones, dates of birth, emails) from
  text; `install_log_redaction` puts it in front of the Serve loggers, so nothing logged
  on a replica holds them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

SYSTEM_PROMPT = (
    "You are raymed, a medical information assistant. Give general, factual health information "
    "in plain language. You are not a doctor: do not diagnose, do not prescribe, and say when "
    "someone should see a clinician. If anything suggests an emergency, tell the person to call "
    "their local emergency number now."
)

DISCLAIMER = (
    "raymed gives general information, not medical advice, and can be wrong. "
    "Ask a doctor or pharmacist about your own health; in an emergency call your local emergency number."
)

EMERGENCY_NUMBER = "call your local emergency number (911 in the US, 112 in the EU, 999 in the UK) now"


@dataclass(frozen=True)
class RedFlagRule:
    """A red flag: it fires when every concept in `all_of` is mentioned and not negated."""

    category: str
    guidance: str
    all_of: tuple[re.Pattern, ...]


def _terms(*alternatives: str) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")")


CANT = r"(?:can'?t|cannot|can not|unable to|struggling to|hard to|difficult to|trouble)"
CHEST_PAIN = _terms(r"chest (?:pain|pains|pressure|tightness|is tight|feels tight|hurts|discomfort)",
                    r"(?:pain|pressure|tightness|crushing|squeezing) (?:in|on|across) (?:my |his |her |the )?chest",
                    r"crushing (?:chest|pain)", r"heart attack")
BREATHLESS = _terms(r"short(?:ness)? of breath", r"breathless", r"out of breath", rf"{CANT} (?:\w+ ){{0,2}}breath",
                    r"sweat(?:ing|y)?", r"clammy", r"(?:left )?arm", r"jaw", r"radiat", r"heart attack")
BREATHING_FAILURE = _terms(rf"{CANT} breathe", r"not breathing", r"stopped breathing", r"gasping",
                           r"turning blue", r"(?:lips|face) (?:are |is |went |turned )?blue", r"choking")
STROKE = _terms(r"(?:face|mouth|smile) (?:is |has )?(?:droop|drooping|sagging|fell|dropped)",
                r"droop(?:ing|y)? (?:face|mouth|eyelid|smile)", r"one side of (?:my |his |her |the )?face",
                r"slurr(?:ed|ing)", r"(?:speech|words) (?:is |are )?(?:garbled|jumbled|coming out wrong)",
                rf"{CANT} (?:speak|talk|get (?:my|the) words out)",
                r"(?:weak|weakness|numb|numbness|paralys\w*|can'?t move) (?:\w+ ){0,4}(?:one|left|right) side",
                r"(?:arm|leg|face) (?:suddenly )?(?:went |is |feels )?(?:numb|weak|dead)",
                r"having a stroke", r"worst headache")
ANAPHYLAXIS = _terms(r"(?:throat|tongue|lips?|face|mouth) (?:is |are |has |have |started )?(?:swell|swollen|closing)",
                     r"swelling (?:of|in) (?:my |his |her |the )?(?:throat|tongue|lips?|face)",
                     r"throat (?:is |feels )?(?:tight|closing)", r"anaphyla\w*", r"epi-?pen",
                     r"allergic reaction and (?:\w+ )?(?:can'?t|cannot|struggling)")
SUICIDE = _terms(r"kill(?:ing)? (?:my ?self|me)", r"suicid\w*", r"end(?:ing)? (?:my|it) (?:life|all)",
                 r"want(?:ed)? to die", r"(?:don'?t|do not) want to (?:live|be alive|wake up)",
                 r"better off dead", r"no reason to live", r"self[- ]harm", r"hurt(?:ing)? my ?self",
                 r"cut(?:ting)? my ?self", r"take all (?:my|of my|the) (?:pills|tablets)")
BLEEDING = _terms(r"(?:won'?t|will not|doesn'?t|does not|can'?t|cannot) stop bleeding",
                  r"bleeding (?:won'?t|will not|doesn'?t|does not) stop",
                  r"bleeding (?:heavily|a lot|badly|everywhere|profusely)", r"(?:heavy|severe|uncontrolled) bleeding",
                  r"spurting", r"soaked (?:through )?(?:with|in) blood", r"(?:lots|a lot|pool) of blood",
                  r"(?:vomiting|throwing up|coughing up) blood")
UNRESPONSIVE = _terms(r"unconscious", r"unresponsive", r"won'?t wake up", r"passed out and", r"(?:having|had) a seizure",
                      r"seizure (?:for|that|lasting)", r"collapsed")
POISONING = _terms(r"overdos\w*", r"took too many (?:pills|tablets)", r"swallowed (?:bleach|poison|batter\w*|\w+ pills)",
                   r"drank (?:bleach|antifreeze)", r"poison(?:ed|ing)")

RULES = (
    RedFlagRule("chest_pain", "Chest pain with breathlessness, sweating or pain spreading to the arm or jaw "
                "can be a heart attack: " + EMERGENCY_NUMBER + ". Do not drive yourself.", (CHEST_PAIN, BREATHLESS)),
    RedFlagRule("breathing", "Severe trouble breathing is an emergency: " + EMERGENCY_NUMBER + ".",
                (BREATHING_FAILURE,)),
    RedFlagRule("stroke", "A drooping face, arm or leg weakness, or slurred speech can be a stroke: "
                + EMERGENCY_NUMBER + " and note the time it started.", (STROKE,)),
    RedFlagRule("anaphylaxis", "Swelling of the throat, tongue or lips can be anaphylaxis: use an adrenaline "
                "auto-injector if there is one and " + EMERGENCY_NUMBER + ".", (ANAPHYLAXIS,)),
    RedFlagRule("suicidal_intent", "If you are thinking about ending your life or hurting yourself, you are not "
                "alone: " + EMERGENCY_NUMBER + ", or call or text a crisis line (988 in the US, 116 123 in "
                "the UK and Ireland).", (SUICIDE,)),
    RedFlagRule("severe_bleeding", "Heavy bleeding that will not stop is an emergency: press firmly on the wound "
                "and " + EMERGENCY_NUMBER + ".", (BLEEDING,)),
    RedFlagRule("unresponsive", "Someone unconscious, unresponsive or having a seizure needs help now: "
                + EMERGENCY_NUMBER + ".", (UNRESPONSIVE,)),
    RedFlagRule("poisoning", "A possible overdose or poisoning is an emergency: " + EMERGENCY_NUMBER
                + " or your poison control centre.", (POISONING,)),
)

NEGATION = re.compile(r"\b(?:no|not|without|denies|denied|deny|never|nor|free of|negative for|absence of|"
                      r"isn'?t|wasn'?t|don'?t have|doesn'?t have|didn'?t have|haven'?t had|hasn'?t had)\b")
CLAUSE_BREAK = re.compile(r"[.;!?\n]|\bno\s*,|\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\byet\b")
NEGATION_WINDOW_WORDS = 5
"""A negation cue negates a term when it is at most this many words before it, in the same clause."""


@dataclass(frozen=True)
class SafetyCheck:
    categories: tuple[str, ...]

    @property
    def red_flag(self) -> bool:
        return bool(self.categories)


def normalize(text: str) -> str:
    return " ".join(text.lower().replace("\u2019", "'").replace("\u2018", "'").split())


def _negated(text: str, start: int) -> bool:
    before = CLAUSE_BREAK.split(text[:start])[-1]
    window = " ".join(before.split()[-NEGATION_WINDOW_WORDS:])
    return bool(NEGATION.search(window))


def _mentioned(pattern: re.Pattern, text: str) -> bool:
    return any(not _negated(text, match.start()) for match in pattern.finditer(text))


def check(texts: list[str]) -> SafetyCheck:
    """The red flags raised by what the user wrote (all their messages)."""
    text = "\n".join(normalize(t) for t in texts)
    return SafetyCheck(tuple(rule.category for rule in RULES
                             if all(_mentioned(concept, text) for concept in rule.all_of)))


def banner(result: SafetyCheck) -> str:
    """The emergency guidance that leads a red-flag answer ('' when there is none)."""
    if not result.red_flag:
        return ""
    guidance = " ".join(rule.guidance for rule in RULES if rule.category in result.categories)
    return f"\u26a0 Possible emergency. {guidance}\n\n"


def safety_field(result: SafetyCheck) -> dict:
    """The `safety` object on every answer (and on a stream's first and last chunk)."""
    return {"red_flag": result.red_flag, "categories": list(result.categories),
            "banner": banner(result) or None, "disclaimer": DISCLAIMER}


def with_system_prompt(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """`messages` led by the safety system prompt (a caller's system message follows it, merged)."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{SYSTEM_PROMPT}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": SYSTEM_PROMPT}, *messages]


# ---------------------------------------------------------------- personal identifiers

MONTHS = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
NAME = r"[A-Z][a-z'\-]+(?:\s+[A-Z][a-z'\-]+){0,2}"
IDENTIFIERS = (
    ("[EMAIL]", re.compile(r"[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+")),
    ("[MRN]", re.compile(r"\b(?:MRN|medical record(?: number| no\.?)?|hospital (?:number|no\.?)|patient id|NHS number)"
                         r"\s*(?:is|:|#|=)?\s*[A-Z0-9][A-Z0-9\-]{3,}", re.IGNORECASE)),
    ("[MRN]", re.compile(r"\bMRN[\-:]?\d{4,}\b", re.IGNORECASE)),
    ("[PHONE]", re.compile(r"(?<![\w.\-])(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{2,4}\)|\d{2,4})[\s.\-]\d{3,4}[\s.\-]\d{3,4}"
                           r"(?![\w\-]|\.\d)")),
    ("[PHONE]", re.compile(r"(?<![\w\-])\+\d{9,14}\b")),
    ("[DATE]", re.compile(r"\b\d{1,2}[/.\-]\d{1,2}[/.\-](?:\d{4}|\d{2})\b")),
    ("[DATE]", re.compile(r"\b(?:19|20)\d{2}[/.\-]\d{1,2}[/.\-]\d{1,2}\b")),
    ("[DATE]", re.compile(rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{MONTHS},?\s+\d{{4}}\b", re.IGNORECASE)),
    ("[DATE]", re.compile(rf"\b{MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b", re.IGNORECASE)),
    (r"\1[NAME]", re.compile(rf"\b((?i:my name is|name is|name:|called|named|this is|i am|i'm|patient(?: is|:)?)\s+){NAME}")),
    (r"\1[NAME]", re.compile(rf"\b((?:Mr|Mrs|Ms|Miss|Dr|Prof)\.?\s+){NAME}")),
)


def redact(text: str) -> str:
    """`text` with personal identifiers replaced by placeholders like `[EMAIL]`."""
    for replacement, pattern in IDENTIFIERS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (and traceback) with identifiers redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "raymed_redacted", False):
            return True
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.raymed_redacted = True
        return True


LOGGERS = ("ray.serve", "ray", "")


def install_log_redaction() -> None:
    """Redact every record that reaches the Serve, Ray or root loggers' handlers (idempotent)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if not any(isinstance(f, RedactingFilter) for f in target.filters):
                target.addFilter(RedactingFilter())
