"""`raymed eval --grounded` on real Ray Data: a tiny model, a small index (every medical
abbreviation) and four items. Each item is scored with the server's ungrounded and grounded
system message through eval's actor pool; the picks are those of scoring the same prompts
here, and the retriever's recall is read off the items' entities."""

from __future__ import annotations

import json

import numpy as np
import pytest
from serve_support import save_tiny_model

from raymed.assets.corpus import collect_abbreviations
from raymed.config import load_config
from raymed.eval import load_model
from raymed.index import build_index, open_index
from raymed.index.evaluate import evaluate_grounded, system_message
from raymed.mcq import option_logprobs, pick

ABBREVIATIONS = ("BID", "ECG", "MRI", "NPO")


def items_about(entities) -> list[dict]:
    meanings = [e.facts["meaning"] for e in entities]
    return [{"question": f"What does the abbreviation '{e.key}' stand for in medicine?",
             "options": meanings[i:] + meanings[:i], "answer": 0, "source": "abbreviations",
             "split": "heldout" if i % 2 else "reworded", "entity": e.key} for i, e in enumerate(entities)]


@pytest.mark.slow
def test_grounded_eval_scores_both_prompts_and_the_retrievers_recall(ray_cluster, default_assets, tmp_path,
                                                                     monkeypatch):
    model_dir = save_tiny_model(tmp_path / "tiny", default_assets / "models" / "smollm2-135m-instruct")
    entities = [e for e in collect_abbreviations() if e.key in ABBREVIATIONS and "meaning" in e.facts]
    assert len(entities) == 4
    items = items_about(entities)
    items_path = tmp_path / "items.jsonl"
    items_path.write_text("".join(json.dumps(i) + "\n" for i in items))
    monkeypatch.setenv("RAYMED_CACHE", str(tmp_path / "cache"))
    config = load_config(None, [f"eval.mcq_path={items_path}", "index.sources=[abbreviations]", "index.name=abbr",
                                "serve.grounding_k=2", "eval.bootstrap_samples=200"])
    build_index(config.index)

    report = evaluate_grounded(config, {"tiny": model_dir}, tmp_path / "out")

    found = [open_index(config.index).search(i["question"], 2) for i in items]
    assert report["recall"]["@1"]["all"] == np.mean([f[0]["id"] == f"abbreviations:{i['entity']}"
                                                     for i, f in zip(items, found)])
    model, tokenizer = load_model(model_dir)
    for name, passages in (("ungrounded", [[]] * 4), ("grounded", found)):
        expected = [pick(i["options"], option_logprobs(model, tokenizer, i["question"], i["options"],
                                                       system_message(i["question"], p)))
                    for i, p in zip(items, passages)]
        accuracy = report["models"]["tiny"][name]["mcq_acc"]
        assert accuracy["acc"] == np.mean([e == 0 for e in expected])
        assert accuracy["ci"][0] <= accuracy["acc"] <= accuracy["ci"][1] and accuracy["n"] == 4
    gain = report["models"]["tiny"]["gain"]["mcq_acc"]
    assert gain["diff"] == pytest.approx(report["models"]["tiny"]["grounded"]["mcq_acc"]["acc"]
                                         - report["models"]["tiny"]["ungrounded"]["mcq_acc"]["acc"])
    assert "recall@5" in (tmp_path / "out" / "grounded.md").read_text()
