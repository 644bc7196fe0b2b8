"""The registry: versions and `current`, rollback, a crash injected mid-promotion in a real
subprocess, two real processes promoting at once, a held lock, and corrupt state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from raymed.config import load_config
from raymed.errors import RaymedError
from raymed.registry import STAGING_PREFIX, Registry, StaleCurrent, model_files

CHECKOUT = Path(__file__).resolve().parent.parent


def _model_dir(path: Path, tag: str, weight_bytes: int = 64) -> Path:
    """A model-shaped directory (config, safetensors weights, tokenizer, training state);
    the registry copies files and never loads them, so the bytes only need to be distinct."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "tag": tag}))
    (path / "model.safetensors").write_bytes(tag.encode() * weight_bytes)
    (path / "tokenizer.json").write_text(json.dumps({"tag": tag}))
    (path / "chat_template.jinja").write_text("{{ messages }}")
    (path / "optimizer.pt").write_bytes(b"optimizer state")
    (path / "trainer_state.json").write_text("{}")
    return path


@pytest.fixture
def registry(tmp_path) -> Registry:
    registry = Registry(tmp_path / "registry" / "medical-assistant", lock_timeout_s=5)
    registry.add(_model_dir(tmp_path / "base", "base"), {"metrics": {"val_loss": 3.0}}, expect_current=None)
    return registry


def _run(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`script` in a fresh Python process that imports this checkout's raymed."""
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_versions_current_manifest_and_kept_files(registry, tmp_path):
    assert registry.versions() == ["v1"] and registry.current() == "v1"
    version = registry.add(_model_dir(tmp_path / "cand", "cand"), {"metrics": {"val_loss": 2.0}})
    assert version == "v2" and registry.current() == "v2" and registry.versions() == ["v1", "v2"]
    assert (registry.root / "current").read_text() == "v2\n"
    manifest = registry.manifest("v2")
    assert manifest["name"] == "medical-assistant" and manifest["version"] == "v2"
    assert manifest["metrics"] == {"val_loss": 2.0} and manifest["created"].endswith("Z")
    kept = sorted(p.name for p in registry.path("v2").iterdir())
    assert kept == ["chat_template.jinja", "config.json", "manifest.json", "model.safetensors", "tokenizer.json"]
    assert set(manifest["files"]) == set(kept) - {"manifest.json"}
    assert registry.verify("v1") == [] and registry.verify("v2") == []
    (registry.path("v2") / "model.safetensors").write_bytes(b"tampered")
    assert registry.verify("v2") == ["model.safetensors differs from its manifest"]


def test_a_model_without_safetensors_is_not_registered(registry, tmp_path):
    bad = _model_dir(tmp_path / "bad", "bad")
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(RaymedError, match="no safetensors weights"):
        registry.add(bad, {})
    assert registry.versions() == ["v1"] and registry.current() == "v1"
    assert model_files(tmp_path / "base")[-1].name == "tokenizer.json"


def test_rollback_moves_current_and_can_be_undone(registry, tmp_path):
    registry.add(_model_dir(tmp_path / "a", "a"), {})
    registry.add(_model_dir(tmp_path / "b", "b"), {})
    assert registry.rollback() == ("v3", "v2")
    assert registry.current() == "v2" and registry.versions() == ["v1", "v2", "v3"]
    assert registry.rollback() == ("v2", "v1")
    with pytest.raises(RaymedError, match="nothing before v1"):
        registry.rollback()
    assert registry.rollback("v3") == ("v1", "v3")
    with pytest.raises(RaymedError, match=r"has no version 'v9' \(it has v1, v2, v3\)"):
        registry.rollback("v9")
    assert registry.current() == "v3"


def test_stale_current_refuses_and_changes_nothing(registry, tmp_path):
    registry.add(_model_dir(tmp_path / "a", "a"), {})
    with pytest.raises(StaleCurrent, match="current moved from v1 to v2"):
        registry.add(_model_dir(tmp_path / "b", "b"), {}, expect_current="v1")
    assert registry.versions() == ["v1", "v2"] and registry.current() == "v2"


def test_current_naming_a_missing_version_is_a_clear_error(registry):
    (registry.root / "current").write_text("v7\n")
    with pytest.raises(RaymedError, match="current names 'v7', which is not a complete version"):
        registry.current()


def test_a_uri_storage_path_is_refused_for_now():
    with pytest.raises(RaymedError, match="needs a local or NFS storage_path"):
        Registry.for_config(load_config(None, ["storage_path=s3://bucket/raymed"]))


CRASH = """
    import os, sys
    from pathlib import Path
    import raymed.registry as registry_module
    from raymed.registry import Registry

    root, model_dir, where = sys.argv[1:]
    copy_file, copied = registry_module._copy_file, []

    def copy_then_die(source, target):
        copy_file(source, target)
        copied.append(source.name)
        if where == "copy" and len(copied) == 2:
            os._exit(17)  # the process dies as a kill would: no cleanup, no finally

    def die(self, version):
        os._exit(17)

    registry_module._copy_file = copy_then_die
    if where == "current":
        Registry._set_current = die
    Registry(root).add(Path(model_dir), {"metrics": {}})
"""


@pytest.mark.parametrize("where", ["copy", "current"])
def test_a_crash_mid_promotion_leaves_current_on_the_old_complete_version(registry, tmp_path, where):
    """A real process dies while copying the model in (or just before `current` moves):
    `current` still names v1, v1 is intact, and the next promotion cleans up and succeeds."""
    candidate = _model_dir(tmp_path / "cand", "cand", weight_bytes=1 << 16)
    result = _run(CRASH, str(registry.root), str(candidate), where)
    assert result.returncode == 17, result.stderr
    assert registry.current() == "v1" and registry.verify("v1") == []
    if where == "copy":
        assert registry.versions() == ["v1"]
        assert list(registry.root.glob(f"{STAGING_PREFIX}*")), "the crash should have left a staging directory"
    else:  # renamed complete, never made current
        assert registry.versions() == ["v1", "v2"] and registry.verify("v2") == []
    version = registry.add(candidate, {})
    assert registry.current() == version and registry.verify(version) == []
    assert not list(registry.root.glob(f"{STAGING_PREFIX}*"))


CONCURRENT = """
    import sys, time
    from pathlib import Path
    import raymed.registry as registry_module
    from raymed.registry import Registry

    root, model_dir, name, log, go = sys.argv[1:]
    copy_file = registry_module._copy_file

    def logged_copy(source, target):
        with open(log, "a") as out:
            out.write(f"{name} {source.name}\\n")
        time.sleep(0.05)  # widen the window in which an interleaving would show
        copy_file(source, target)

    registry_module._copy_file = logged_copy
    while not Path(go).exists():  # both processes start promoting at the same moment
        time.sleep(0.005)
    print(Registry(root, lock_timeout_s=30).add(Path(model_dir), {"source": {"trial": name}}))
"""


def test_two_processes_promoting_at_once_never_interleave(registry, tmp_path):
    log, go = tmp_path / "copies.log", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    processes = {
        name: subprocess.Popen([sys.executable, "-c", textwrap.dedent(CONCURRENT), str(registry.root),
                                str(_model_dir(tmp_path / name, name)), name, str(log), str(go)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("A", "B")
    }
    time.sleep(1.0)  # both imported and polling (a late one only makes the test weaker, never flaky)
    go.touch()
    versions = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        versions[name] = out.strip()
    assert sorted(versions.values()) == ["v2", "v3"]
    writers = [line.split()[0] for line in log.read_text().splitlines()]
    first = writers[0]
    assert writers == [first] * 4 + [first == "A" and "B" or "A"] * 4, writers  # one whole copy, then the other
    for name, version in versions.items():
        assert registry.manifest(version)["source"]["trial"] == name and registry.verify(version) == []
        assert json.loads((registry.path(version) / "config.json").read_text())["tag"] == name
    assert registry.current() == "v3"


def test_a_held_lock_makes_a_second_promotion_fail_cleanly(registry, tmp_path):
    waiting = Registry(registry.root, lock_timeout_s=0.3)
    with registry.lock():
        started = time.monotonic()
        with pytest.raises(RaymedError, match=rf"registry .* is busy: pid {os.getpid()} .* still holds its lock after 0.3s"):
            waiting.add(_model_dir(tmp_path / "late", "late"), {})
        assert time.monotonic() - started >= 0.3
    assert registry.versions() == ["v1"] and registry.current() == "v1"
    assert waiting.add(tmp_path / "late", {}) == "v2"  # free again once released


def test_registry_cli_lists_shows_and_rolls_back(tmp_path, capsys):
    from raymed.cli import main

    store = ["--set", f"storage_path={tmp_path}"]
    assert main(["registry", "list", *store]) == 0
    assert "is empty (the base model is registered as v1 on first use)" in capsys.readouterr().out
    registry = Registry.for_config(load_config(None, [f"storage_path={tmp_path}"]))
    registry.add(_model_dir(tmp_path / "base", "base"), {"source": {"base_model": "smollm2"}, "metrics": {}})
    registry.add(_model_dir(tmp_path / "cand", "cand"),
                 {"source": {"trial": "t1", "checkpoint": "/ck/1"}, "metrics": {"val_loss": 2.5, "mcq_acc": 0.4}})
    assert main(["registry", "list", *store]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("  v1 ") and lines[1].split()[2:] == ["-", "-", "smollm2"]
    assert lines[2].startswith("* v2 ") and lines[2].split()[3:] == ["2.5000", "0.4000", "t1:", "/ck/1"]
    assert main(["registry", "show", *store]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "v2" and shown["path"] == str(registry.root / "v2")
    assert main(["registry", "rollback", *store]) == 0
    assert capsys.readouterr().out.strip() == "current: v2 → v1 (the next deploy serves v1)"
    assert main(["registry", "rollback", "v5", *store]) == 1
    assert "has no version 'v5'" in capsys.readouterr().err
