"""`raymed data inspect` end to end (in-process CLI on the session's Ray cluster)."""

from __future__ import annotations

import json

import pytest

from raymed.cli import main

RECORDS = [{"instruction": f"Define term {i}.", "output": f"Term {i} is a medical word."} for i in range(30)]


@pytest.fixture(autouse=True)
def _cluster(ray_cluster, default_assets):
    pass


def test_inspect_reports_counts_efficiency_histogram_and_plot(tmp_path, capsys):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "{broken\n")
    png = tmp_path / "lengths.png"
    assert main(["data", "inspect", f"file://{path}", "--config", "ci-tiny", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "shape:              instruction" in out
    assert "rows read:          31 = kept 30 + bad 1" in out
    assert "bad rows by reason: malformed_json 1" in out
    assert "packing efficiency:" in out
    assert out.count("#") > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_fail_mode_exits_non_zero_with_one_line(tmp_path, capsys):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"instruction": "x", "output": "  "}) + "\n")
    code = main(["data", "inspect", str(path), "--config", "ci-tiny", "--set", "data.on_bad_row=fail"])
    # Only our own line: Ray's loggers may also write to the captured stderr.
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("raymed: error:")]
    assert code == 1
    assert "1 bad rows" in error and "empty_text: 1" in error and "on_bad_row=skip" in error
