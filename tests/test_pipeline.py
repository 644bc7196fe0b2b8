"""The pipeline's stage runner: fingerprints, skipping, re-running what changed, failures
that name their stage; and the job entrypoint failing fast on a missing config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raymed.config import load_config
from raymed.errors import RaymedError
from raymed.pipeline import complete_answer, raymed_stages
from raymed.stages import Stage, StageFailed, read_record, run_stages

REPO = Path(__file__).resolve().parent.parent


class Chain:
    """Three stages a → b → c writing files; `inputs` are what each depends on, `calls`
    counts runs, `fail` names a stage that raises."""

    def __init__(self, root: Path):
        self.root = root
        self.inputs = {"a": {"x": 1}, "b": {"y": 1}, "c": {"z": 1}}
        self.calls = {"a": 0, "b": 0, "c": 0}
        self.cleared: list[str] = []
        self.fail: str | None = None

    def stage(self, name: str, upstream: tuple[str, ...]) -> Stage:
        return Stage(name, lambda up: self._run(name, up), inputs=lambda: self.inputs[name], upstream=upstream,
                     clear=lambda: self.cleared.append(name))

    def _run(self, name: str, up: dict) -> dict:
        if name == self.fail:
            raise ValueError(f"{name} cannot read its input")
        self.calls[name] += 1
        out = self.root / f"{name}.txt"
        out.write_text(json.dumps({"inputs": self.inputs[name], "from": sorted(up)}))
        return {"paths": [str(out)], "value": self.calls[name]}

    def run(self, log=lambda line: None) -> dict:
        stages = [self.stage("a", ()), self.stage("b", ("a",)), self.stage("c", ("b",))]
        return run_stages(stages, self.root / "records", log=log)


def statuses(result: dict) -> dict[str, str]:
    return {name: run.status for name, run in result.items()}


def test_rerun_skips_stages_whose_inputs_are_unchanged(tmp_path):
    chain = Chain(tmp_path)
    assert statuses(chain.run()) == {"a": "ran", "b": "ran", "c": "ran"}
    again = chain.run()
    assert statuses(again) == {"a": "skipped", "b": "skipped", "c": "skipped"}
    assert chain.calls == {"a": 1, "b": 1, "c": 1}
    assert again["c"].outputs["value"] == 1  # a skipped stage hands on its recorded outputs


def test_each_stage_logs_one_line_once_it_ran_or_was_skipped(tmp_path):
    chain, lines = Chain(tmp_path), []
    chain.run(log=lines.append)
    chain.inputs["c"] = {"z": 2}
    chain.run(log=lines.append)
    assert [line.split(" in ")[0] for line in lines[:3]] == [f"[pipeline] {name}: ran" for name in "abc"]
    assert lines[3].startswith("[pipeline] a: skipped (up to date") and lines[4].startswith("[pipeline] b: skipped")
    assert lines[5].startswith("[pipeline] c: ran in ") and lines[5].endswith(
        " s (inputs changed: its earlier outputs were removed)")
    assert len(lines) == 6


def test_an_answer_the_model_finished_is_shown_as_it_is():
    assert complete_answer("Fatigue and pallor. See a doctor", "stop", 48) == "Fatigue and pallor. See a doctor"


def test_an_answer_cut_at_max_tokens_ends_at_its_last_full_sentence_with_a_note():
    text = 'Iron carries oxygen. Symptoms include "fatigue!" (and pallor.) Others are shortness of breath,'
    assert complete_answer(text, "length", 48) == ('Iron carries oxygen. Symptoms include "fatigue!" (and pallor.)\n'
                                                   "(trimmed to its last full sentence: the answer reached "
                                                   "pipeline.max_tokens=48)")
    assert complete_answer("Iron deficiency anemia causes fatigue,", "length", 8) == (
        "Iron deficiency anemia causes fatigue, … (unfinished: the answer reached pipeline.max_tokens=8)")
    assert complete_answer("A ratio of 2.5 is high", "length", 8).startswith("A ratio of 2.5 is high …")


def test_a_changed_input_reruns_that_stage_and_everything_downstream(tmp_path):
    chain = Chain(tmp_path)
    chain.run()
    chain.inputs["b"] = {"y": 2}
    assert statuses(chain.run()) == {"a": "skipped", "b": "ran", "c": "ran"}
    assert chain.cleared == ["b", "c"]  # stale outputs removed before re-running
    chain.inputs["c"] = {"z": 2}
    assert statuses(chain.run()) == {"a": "skipped", "b": "skipped", "c": "ran"}


def test_a_stage_whose_outputs_are_gone_runs_again(tmp_path):
    chain = Chain(tmp_path)
    chain.run()
    (tmp_path / "b.txt").unlink()
    assert statuses(chain.run()) == {"a": "skipped", "b": "ran", "c": "skipped"}
    assert chain.cleared == []  # same inputs: nothing to clear (a resumable stage continues)


def test_a_failing_stage_names_itself_and_a_rerun_continues_from_it(tmp_path):
    chain = Chain(tmp_path)
    chain.fail = "b"
    with pytest.raises(StageFailed, match=r"stage 'b' failed: b cannot read its input.*completed stages \(a\)"):
        chain.run()
    record = read_record(tmp_path / "records", "b")
    assert record["status"] == "failed" and "cannot read" in record["error"]
    assert read_record(tmp_path / "records", "c") is None
    chain.fail = None
    assert statuses(chain.run()) == {"a": "skipped", "b": "ran", "c": "ran"}
    assert chain.calls == {"a": 1, "b": 1, "c": 1}


def test_an_always_run_stage_with_the_same_outputs_leaves_downstream_skipped(tmp_path):
    chain = Chain(tmp_path)
    produced = {"digest": "d1"}
    check = Stage("check", lambda up: dict(produced), inputs=None)

    def run() -> dict[str, str]:
        stages = [check, chain.stage("a", ("check",)), chain.stage("b", ("a",))]
        return statuses(run_stages(stages, tmp_path / "records", log=lambda line: None))

    assert run() == {"check": "ran", "a": "ran", "b": "ran"}
    assert run() == {"check": "ran", "a": "skipped", "b": "skipped"}
    produced["digest"] = "d2"  # e.g. a rebuilt corpus
    assert run() == {"check": "ran", "a": "ran", "b": "ran"}


def test_a_stage_whose_outputs_no_longer_hold_runs_again(tmp_path):
    # The promote stage's outputs name the registry's current version; once something outside
    # the pipeline moves it, the gate's decision is stale.
    chain = Chain(tmp_path)
    world = {"current": "v2"}
    chain.run()

    def run() -> dict[str, str]:
        gate = Stage("gate", lambda up: {"current": world["current"]}, inputs=lambda: {"metric": "val_loss"},
                     upstream=("a",), still_true=lambda outputs: outputs["current"] == world["current"])
        return statuses(run_stages([chain.stage("a", ()), gate], tmp_path / "records", log=lambda line: None))

    assert run() == {"a": "skipped", "gate": "ran"}
    assert run() == {"a": "skipped", "gate": "skipped"}
    world["current"] = "v1"  # e.g. `raymed registry rollback v1`
    assert run() == {"a": "skipped", "gate": "ran"}
    assert run() == {"a": "skipped", "gate": "skipped"}


def test_the_promote_stage_is_stale_once_the_registry_current_moves(tiny_model, tmp_path):
    from raymed.registry import Registry

    config = load_config("ci-tiny", [f"storage_path={tmp_path}"])
    registry = Registry.for_config(config)
    for seed in (0, 1):
        registry.add(tiny_model.save(tiny_model(seed), tmp_path / f"m{seed}"), {"metrics": {}})
    (promote,) = [s for s in raymed_stages(config, log=print) if s.name == "promote"]
    assert promote.still_true({"current": "v2"})
    registry.rollback("v1")
    assert not promote.still_true({"current": "v2"})


def test_a_torn_record_counts_as_not_done(tmp_path):
    chain = Chain(tmp_path)
    chain.run()
    (tmp_path / "records" / "a.json").write_text('{"stage": "a", "status": "do')
    assert statuses(chain.run())["a"] == "ran"


def test_each_raymed_stage_depends_on_its_own_config_fields(tmp_path):
    corpus = tmp_path / "qa.jsonl"
    corpus.write_text(json.dumps({"question": "What is a fever?", "answer": "A high temperature."}) + "\n")
    base = [f"data.train_path={corpus}", f"storage_path={tmp_path}"]

    def inputs(*overrides: str) -> dict:
        config = load_config("ci-tiny", [*base, *overrides])
        return {s.name: s.inputs() for s in raymed_stages(config, log=print) if s.inputs}

    reference = inputs()
    assert set(reference) == {"data", "train", "evaluate", "promote"}
    changed = {
        "train.lr=0.002": {"train"},
        "data.block_size=64": {"data", "evaluate"},
        "eval.max_items=5": {"evaluate", "promote"},
        "pipeline.tune=true": {"train"},
        "model.add_tokens=[<dx>]": {"data", "train"},  # task tokens change the ids the data stage writes
        "serve.port=9000": set(),  # deploy and ask run every time anyway
        "pipeline.question=What is asthma?": set(),
    }
    for override, expected in changed.items():
        now = inputs(override)
        assert {name for name in reference if now[name] != reference[name]} == expected, override
    # pipeline.distill adds the distill stage after the gate; it follows the fine-tune's fields and its own
    with_distill = inputs("pipeline.distill=true")
    names = [s.name for s in raymed_stages(load_config("ci-tiny", [*base, "pipeline.distill=true"]), log=print)]
    assert names.index("distill") == names.index("promote") + 1 and names[-2:] == ["deploy", "ask"]
    assert {name: value for name, value in with_distill.items() if name != "distill"} == reference
    for override, moves in {"distill.alpha=0.2": True, "train.lr=0.002": True, "serve.port=9000": False}.items():
        assert (inputs("pipeline.distill=true", override)["distill"] != with_distill["distill"]) is moves, override
    corpus.write_text(corpus.read_text() + json.dumps({"question": "Asthma?", "answer": "A lung disease."}) + "\n")
    # the corpus's content is the data stage's input; later stages follow through upstream fingerprints
    assert {name for name, value in inputs().items() if value != reference[name]} == {"data"}


def test_the_job_fails_fast_on_a_missing_config_before_touching_ray(tmp_path):
    # An unreachable RAY_ADDRESS: a job that tried to join the cluster would hang or fail differently.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "127.0.0.1:9"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "jobs/pipeline.py", "--config", str(tmp_path / "missing.yaml")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"config '{tmp_path / 'missing.yaml'}' not found" in done.stderr
    assert "Connecting to existing Ray cluster" not in done.stderr + done.stdout
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_max_validation_records_reads_only_the_first_records(ray_cluster, smollm2_tokenizer, tmp_path):
    from raymed.data.pipeline import build_datasets

    def write(name: str, count: int) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps({"question": f"What is sign {i}?", "answer": f"Sign {i} is a rash."}) + "\n"
                                for i in range(count)))
        return path

    train, validation = write("train.jsonl", 40), write("validation.jsonl", 30)
    config = load_config("ci-tiny", [f"data.train_path={train}", f"data.validation_path={validation}",
                                     "data.block_size=64", "data.max_validation_records=5"])
    _, stats = build_datasets(config)
    assert stats.rows_read == stats.kept == 45
    with pytest.raises(RaymedError, match="needs a validation file"):
        build_datasets(config.model_copy(update={"data": config.data.model_copy(update={"validation_path": None})}))
