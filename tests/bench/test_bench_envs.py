"""Smoke: `tidal bench envs --quick` runs as a subprocess and writes the report docs/performance.md fixes."""

import importlib.util
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_envs_quick(tmp_path):
    out = tmp_path / "envs.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tidal", "bench", "envs", "--quick", "--seconds", "0.1", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["bench"] == "envs" and set(report) == {"bench", "machine", "config", "results", "summary"}
    suites = {(r["env"], r["concurrency"]) for r in report["results"] if r["case"] == "suite"}
    for env_id in report["config"]["envs"]:
        assert {(env_id, c) for c in (1, 64, 1024)} <= suites
    assert all(r["steps_per_s"] > 0 for r in report["results"] if not r.get("blocking"))  # a sandbox may not finish one in 0.1 s
    assert report["summary"]["games_overhead_vs_direct"] > 0
    if importlib.util.find_spec("gem"):
        assert report["summary"]["overhead_vs_direct"] > 0 and report["summary"]["vs_gem_async_1024"] > 0
        assert {"gem_direct", "gem_sync_vector", "gem_async_vector", "tidal_gem_adapter"} <= {
            r["case"] for r in report["results"]
        }
    assert "summary" in proc.stdout and "overhead" in proc.stdout
