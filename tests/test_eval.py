"""Evaluation: the option scorer on a case with a known answer, metrics against hand-computed
values, the paired bootstrap, bad input, and a real Ray Data batch-inference run that must
agree with scoring the same model in-process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from raymed.config import load_config
from raymed.errors import RaymedError
from raymed.eval import (
    evaluate,
    find_checkpoints,
    load_items,
    mcq_metrics,
    paired_bootstrap,
    render_table,
    resolve_model_dir,
    validation_blocks,
)
from raymed.mcq import option_logprobs, pick
from raymed.train.metrics import val_metrics

ORGANS = ["heart", "liver", "kidney", "lung"]  # one or two tokens each, differing from the first
KNOWN = [("Which organ pumps blood around the body?", 0), ("Which organ filters blood to make urine?", 2)]


def _item(**changes) -> dict:
    item = {"question": "Q?", "options": ["a", "b", "c", "d"], "answer": 1, "source": "hpo", "split": "heldout"}
    return {**item, **changes}


def _write_items(path: Path, items: list) -> Path:
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items))
    return path


def test_pick_normalises_by_option_length():
    options = ["ab", "abcdefgh"]
    logprobs = [-4.0, -8.0]  # per character: -2.0 vs -1.0
    assert pick(options, logprobs, length_norm=False) == 0
    assert pick(options, logprobs, length_norm=True) == 1


def test_scorer_picks_the_answer_a_model_has_learned(tiny_model):
    """A tiny model trained to answer two questions (same options, different answers) must
    score each question's own answer highest: the scorer reads the question, then the option.
    (Untrained, this model picks the same option for both.)"""
    tokenizer = tiny_model.tokenizer
    model = tiny_model(seed=0).train()
    rows = []
    for question, answer in KNOWN:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        answer_ids = tokenizer(ORGANS[answer], add_special_tokens=False).input_ids
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for question, answer in KNOWN:
        logprobs = option_logprobs(model, tokenizer, question, ORGANS)
        assert pick(ORGANS, logprobs) == answer, (question, logprobs)


def test_option_logprobs_equal_each_option_scored_in_its_own_forward(tiny_model):
    """The prompt's cache repeated for every option gives the sums a separate, uncached
    forward of prompt + option gives (options of different token lengths, so padding too)."""
    tokenizer, model = tiny_model.tokenizer, tiny_model(seed=1).eval()
    question, options = "Which organ filters blood?", ["kidney", "the liver, mostly", "lung", "a heart"]
    prompt = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                     add_generation_prompt=True), add_special_tokens=False).input_ids
    expected = []
    for option in options:
        ids = tokenizer(option, add_special_tokens=False).input_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt + ids])).logits[0].float(), dim=-1)
        expected.append(sum(logprobs[len(prompt) - 1 + t, token].item() for t, token in enumerate(ids)))
    assert option_logprobs(model, tokenizer, question, options) == pytest.approx(expected, abs=1e-4)


def test_mcq_metrics_match_a_hand_computed_example():
    items = [_item(split="heldout", source="hpo"), _item(split="heldout", source="drugs"),
             _item(split="reworded", source="hpo"), _item(split="reworded", source="hpo"),
             _item(split="reworded", source="drugs")]
    correct = np.array([True, False, True, True, False])
    assert mcq_metrics(items, correct) == {
        "mcq_acc": 3 / 5,
        "mcq_acc/heldout": 1 / 2, "mcq_acc/reworded": 2 / 3,
        "mcq_acc/drugs": 0 / 2, "mcq_acc/hpo": 3 / 3,
    }


def test_val_metrics_match_a_hand_computed_example():
    metrics = val_metrics(loss_sum=6.0, correct=3, count=4)
    assert metrics == {"val_loss": 1.5, "val_ppl": pytest.approx(math.exp(1.5)), "val_token_acc": 0.75}
    with pytest.raises(RaymedError, match="no tokens"):
        val_metrics(0.0, 0, 0)


def test_paired_bootstrap_degenerate_cases_and_normal_approximation():
    same = np.array([1, 0, 1, 1, 0], dtype=bool)
    assert paired_bootstrap(same, same) == (0.0, 0.0, 0.0)
    assert paired_bootstrap(np.zeros(50, bool), np.ones(50, bool)) == (1.0, 1.0, 1.0)
    # Reference always wrong, candidate right on half of 400 items: the difference is a
    # proportion, 0.5 ± 1.96·sqrt(0.25/400) = 0.5 ± 0.049 by the normal approximation.
    candidate = np.arange(400) % 2 == 0
    diff, low, high = paired_bootstrap(np.zeros(400, bool), candidate, samples=4000)
    assert diff == 0.5
    assert low == pytest.approx(0.451, abs=0.01) and high == pytest.approx(0.549, abs=0.01)
    assert paired_bootstrap(np.zeros(400, bool), candidate, samples=4000) == (diff, low, high)  # fixed seed


def test_paired_bootstrap_pairs_items():
    """The same per-item outcomes shifted by one item: unpaired, the accuracies are equal
    and a paired test must still see every item change (the CI is wide, around 0)."""
    reference = np.arange(100) % 2 == 0
    diff, low, high = paired_bootstrap(reference, ~reference)
    assert diff == 0.0 and low < -0.15 and high > 0.15


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "line 2: not valid JSON"),
        (json.dumps(["a list"]), "line 2: an item must be a JSON object"),
        (json.dumps(_item(question="")), "line 2: question must be a non-empty string"),
        (json.dumps(_item(options="a b c d")), "line 2: options must be a list"),
        (json.dumps(_item(options=["a", ""])), "line 2: every option must be a non-empty string"),
        (json.dumps(_item(options=["a", "a"], answer=0)), "line 2: options must differ"),
        (json.dumps(_item(answer=4)), r"line 2: answer must be an index into options, 0..3 \(got 4\)"),
        (json.dumps(_item(answer=True)), "line 2: answer must be an index"),
        (json.dumps({k: v for k, v in _item().items() if k != "split"}), "line 2: split must be a non-empty string"),
    ],
)
def test_malformed_items_are_named_with_their_line(tmp_path, line, problem):
    path = _write_items(tmp_path / "items.jsonl", [_item(), line])
    with pytest.raises(RaymedError, match=problem):
        load_items(path)


def test_an_empty_eval_file_is_an_error(tmp_path):
    with pytest.raises(RaymedError, match="has no items"):
        load_items(_write_items(tmp_path / "empty.jsonl", []))


def test_max_items_is_a_seeded_sample(tmp_path):
    path = _write_items(tmp_path / "items.jsonl", [_item(question=f"Q{i}?") for i in range(50)])
    first = load_items(path, max_items=10, seed=3)
    assert len(first) == 10 and first == load_items(path, max_items=10, seed=3)
    assert first != load_items(path, max_items=10, seed=4)
    assert len(load_items(path, max_items=500)) == 50


def test_directories_that_are_not_models_are_refused(tmp_path, tiny_model):
    with pytest.raises(RaymedError, match="is not a directory"):
        resolve_model_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RaymedError, match=r"not a model directory \(no config.json\)"):
        resolve_model_dir(tmp_path / "empty")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(RaymedError, match="only pytorch_model.bin, and only safetensors weights are loaded"):
        resolve_model_dir(pickled)
    model_dir = tiny_model.save(tiny_model(), tmp_path / "model")
    assert resolve_model_dir(model_dir) == model_dir
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(RaymedError, match="is a BertForMaskedLM, not a causal language model"):
        resolve_model_dir(model_dir)


def test_checkpoints_are_found_in_a_run_directory(tmp_path, tiny_model):
    model = tiny_model()
    run = tmp_path / "train" / "my-run"
    for name in ("checkpoint_000002", "checkpoint_000001"):
        tiny_model.save(model, run / name)
        (run / name / "optimizer.pt").write_bytes(b"\0")  # training state beside the model is fine
    assert find_checkpoints(tmp_path / "train") == [run / "checkpoint_000001", run / "checkpoint_000002"]
    assert find_checkpoints(run / "checkpoint_000001") == [run / "checkpoint_000001"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("no model here")
    with pytest.raises(RaymedError, match="not a model directory"):
        find_checkpoints(tmp_path / "notes")


@pytest.mark.slow
def test_batch_inference_agrees_with_in_process_scoring(ray_cluster, tiny_model, tmp_path):
    """Base vs candidate through Ray Data actor pools: every pick and the validation metrics
    equal what the same models give in this process; the report and table hold both."""
    from raymed.train import validate

    base_dir = tiny_model.save(tiny_model(seed=0), tmp_path / "base")
    candidate_dir = tiny_model.save(tiny_model(seed=1), tmp_path / "candidate")
    config = load_config("ci-tiny", [f"storage_path={tmp_path}", "eval.max_items=16", "eval.actors=2",
                                     "eval.items_per_batch=3", "eval.bootstrap_samples=500",
                                     "data.max_validation_records=64"])
    report, path = evaluate(config, candidate_dir, base=base_dir, out_dir=tmp_path / "out")

    assert path == tmp_path / "out" / "eval.json" and json.loads(path.read_text()) == report
    assert (tmp_path / "out" / "eval.md").read_text().strip() == render_table(report)
    items = load_items(report["items"]["path"], max_items=16, seed=config.seed)
    blocks = validation_blocks(config, base_dir)
    for label, directory in (("base", base_dir), ("candidate", candidate_dir)):
        from raymed.eval import load_model

        model, tokenizer = load_model(directory)
        expected_picks = [pick(i["options"], option_logprobs(model, tokenizer, i["question"], i["options"]))
                          for i in items]
        assert report["picks"][label] == expected_picks
        batches = ({k: torch.as_tensor(b[k]) for k in ("input_ids", "labels", "position_ids")}
                   for b in blocks.iter_batches(batch_size=8, batch_format="numpy"))
        expected = validate(model, batches)
        metrics = report["models"][label]["metrics"]
        for name, value in expected.items():
            assert metrics[name] == pytest.approx(value, rel=1e-4), (label, name)
        correct = np.array(expected_picks) == np.array([i["answer"] for i in items])
        assert metrics["mcq_acc"] == pytest.approx(correct.mean())
        assert {"mcq_acc/heldout", "mcq_acc/reworded"} <= metrics.keys()
    comparison = report["comparisons"]["candidate"]
    assert comparison["val_loss"]["diff"] == pytest.approx(
        report["models"]["candidate"]["metrics"]["val_loss"] - report["models"]["base"]["metrics"]["val_loss"])
    low, high = comparison["mcq_acc"]["ci"]
    assert low <= comparison["mcq_acc"]["diff"] <= high
    assert "candidate − base (95% CI)" in render_table(report)


def test_the_cli_refuses_a_non_model_before_starting_ray(tmp_path, capsys):
    from raymed.cli import main

    assert main(["eval", "--model", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"raymed: error: {tmp_path} is not a model directory (no config.json): "
        "give a Hugging Face model directory or a training checkpoint")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("eval.max_items=0", "eval.max_items: Input should be greater than or equal to 1 (got 0)"),
        ("eval.gate_metric=acc", "eval.gate_metric: Input should be 'val_loss' or 'mcq_acc' (got 'acc')"),
        ("eval.confidence=1.5", "eval.confidence: Input should be less than 1 (got 1.5)"),
        ("eval.gpus=1", "eval.gpus: unknown field (got 1)"),
        ("registry.name=a/b", "registry.name: String should match pattern"),
    ],
)
def test_eval_and_registry_config_errors_name_the_field(override, expected):
    with pytest.raises(RaymedError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])
