"""The asset cache: idempotent builds, corrupt-entry recovery, atomic writes, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raymed.assets import asset_path, build_assets, cache, check_assets
from raymed.assets.cache import Asset
from raymed.assets.models import package_dir
from raymed.cli import main
from raymed.errors import RaymedError

CHEAP = ("gpt2-tokenizer", "corpus")
TRAIN = "corpus/medical-v1/train.jsonl"


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    build_assets(root, CHEAP)
    return root


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(root).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def test_layout_matches_design(built_cache):
    for rel in ("tokenizers/gpt2/tokenizer.json", TRAIN, "corpus/medical-v1/validation.jsonl",
                "eval/medical-mcq-v1.jsonl"):
        assert (built_cache / rel).is_file(), rel
    assert not list((built_cache / cache.STAGING).iterdir())


def test_second_run_does_no_work(built_cache):
    before = _snapshot(built_cache)
    statuses = build_assets(built_cache, CHEAP)
    assert [s.state for s in statuses] == ["present", "present"]
    assert _snapshot(built_cache) == before  # no file rewritten, not even a manifest


def test_truncated_file_is_detected_and_rebuilt(built_cache):
    original = (built_cache / TRAIN).read_bytes()
    (built_cache / TRAIN).write_bytes(original[: len(original) // 2])
    corpus_status = {s.name: s.state for s in check_assets(built_cache)}["corpus"]
    assert "truncated" in corpus_status
    with pytest.raises(RaymedError, match="run `raymed assets`"):
        asset_path("corpus/medical-v1", built_cache)
    [status] = build_assets(built_cache, ("corpus",))
    assert status.state == "built"
    assert (built_cache / TRAIN).read_bytes() == original


def test_same_size_corruption_is_caught_by_checksum(built_cache):
    path = built_cache / "tokenizers/gpt2/tokenizer.json"
    original = path.read_bytes()
    path.write_bytes(b"X" + original[1:])
    states = {s.name: s.state for s in check_assets(built_cache)}
    assert "checksum mismatch" in states["gpt2-tokenizer"]
    build_assets(built_cache, ("gpt2-tokenizer",))
    assert path.read_bytes() == original


def test_missing_or_garbled_manifest_means_rebuild(built_cache):
    manifest = built_cache / cache.MANIFESTS / "corpus.json"
    manifest.write_text('{"files": ')
    [status] = build_assets(built_cache, ("corpus",))
    assert status.state == "built"
    assert json.loads(manifest.read_text())["asset"] == "corpus"


def test_other_seed_rebuilds_and_differs(tmp_path):
    build_assets(tmp_path, ("corpus",), seed=0)
    first = (tmp_path / TRAIN).read_bytes()
    [status] = build_assets(tmp_path, ("corpus",), seed=1)
    assert status.state == "built"
    assert (tmp_path / TRAIN).read_bytes() != first


def _failing_build(staging: Path, seed: int, progress) -> dict:
    (staging / "out").mkdir()
    (staging / "out" / "half.txt").write_text("half-written")
    raise OSError("disk full")


def _good_build(staging: Path, seed: int, progress) -> dict:
    (staging / "out").mkdir()
    (staging / "out" / "whole.txt").write_text("complete")
    return {}


def test_failed_build_leaves_the_previous_version_and_no_debris(tmp_path):
    good = Asset("demo", ("out",), _good_build, recipe="1")
    cache.build(good, tmp_path, seed=0)
    failing = Asset("demo", ("out",), _failing_build, recipe="2")
    with pytest.raises(OSError, match="disk full"):
        cache.build(failing, tmp_path, seed=0)
    assert (tmp_path / "out" / "whole.txt").read_text() == "complete"
    assert not (tmp_path / "out" / "half.txt").exists()
    assert not list((tmp_path / cache.STAGING).iterdir())
    assert cache.check(good, tmp_path, seed=0, full=True) is None


def test_failed_first_build_leaves_nothing_that_looks_complete(tmp_path):
    failing = Asset("demo", ("out",), _failing_build, recipe="1")
    with pytest.raises(OSError):
        cache.build(failing, tmp_path, seed=0)
    assert not (tmp_path / "out").exists()
    assert cache.check(failing, tmp_path, seed=0, full=False) == "missing"


def test_unwritable_cache_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = main(["assets", "--only", "gpt2-tokenizer", "--cache", str(blocker / "cache")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert "is not writable" in err and "RAYMED_CACHE" in err


def test_missing_package_names_the_install_command():
    with pytest.raises(RaymedError, match="no_such_pkg is not installed: run `make install` or `pip install x`"):
        package_dir(("no_such_pkg", "pip install x"))


def test_unknown_asset_is_rejected(tmp_path):
    with pytest.raises(RaymedError, match="unknown asset weights: choose from model, gpt2-tokenizer, corpus"):
        build_assets(tmp_path, ("weights",))


def test_cli_check_fails_when_assets_are_missing(tmp_path, capsys):
    assert main(["assets", "--check", "--cache", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "model           missing" in out.out
    assert "run `raymed assets`" in out.err


def test_the_converted_model_and_what_is_trained_from_it_carry_the_recommended_sampling(tmp_path, smollm2_tokenizer):
    """`raymed assets` writes SmolLM2-Instruct's sampling into the converted model's
    generation config; a training checkpoint and a registry version keep it; Serve reads it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from raymed.assets.models import without_quantization
    from raymed.config import ServeConfig
    from raymed.registry import Registry
    from raymed.serve.model_source import sampling_defaults
    from raymed.train import save_checkpoint_model

    torch.manual_seed(0)
    gguf_like = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32,
                                                             num_hidden_layers=1, num_attention_heads=2))
    gguf_like.config.quantization_config = {"quant_method": "gguf"}  # what the GGUF loader leaves behind
    converted = without_quantization(gguf_like)
    converted.save_pretrained(tmp_path / "converted")
    expected = {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.0}
    assert sampling_defaults(tmp_path / "converted", ServeConfig()) == expected

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "converted")  # as raymed.train loads a base model
    save_checkpoint_model(trained, smollm2_tokenizer, tmp_path / "checkpoint")
    assert sampling_defaults(tmp_path / "checkpoint", ServeConfig()) == expected
    registry = Registry(tmp_path / "registry" / "medical-assistant")
    version = registry.add(tmp_path / "checkpoint", {"metrics": {}})
    assert sampling_defaults(registry.path(version), ServeConfig()) == expected
    assert sampling_defaults(tmp_path / "nowhere", ServeConfig(default_temperature=0.5))["temperature"] == 0.5
