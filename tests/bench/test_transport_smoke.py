"""Smoke test of the real entry point: `tidal bench transport --quick --json OUT` as a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_transport_quick_writes_the_report(tmp_path):
    out = tmp_path / "transport.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tidal", "bench", "transport", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["bench"] == "transport"
    assert set(report) == {"bench", "machine", "config", "results", "summary"}
    assert report["config"]["quick"] is True
    assert set(report["summary"]) == {"vs_raw_zmq_32k", "mb_per_s_32k", "vs_pickle_32k", "p99_latency_ms_4k"}
    assert all(v > 0 for v in report["summary"].values())
    cases = {(r["tokens"], r["method"]) for r in report["results"]}
    assert cases == {(t, m) for t in (4096, 32768) for m in ("tidal", "pickle", "json", "raw_zmq", "memcpy")}
    for row in report["results"]:
        assert row["msgs_per_s"] > 0 and row["mb_per_s"] > 0
        if row["method"] != "memcpy":
            assert 0 < row["p50_latency_ms"] <= row["p99_latency_ms"]
        if row["method"] == "tidal":
            for key in ("vs_pickle", "vs_json", "vs_raw_zmq", "fraction_of_memcpy"):
                assert row[key] > 0
            # Arrays travel as raw bytes: json's lists must lose clearly to them at 32k tokens.
            if row["tokens"] == 32768:
                assert row["vs_json"] > 2
    assert "summary" in proc.stdout  # the human-readable table went to stdout
