"""Smoke: `tidal bench async-vs-sync --quick` runs as a subprocess and writes the report docs/performance.md
fixes; its figures follow from its rows and its cost model (no wall-clock limits)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_async_vs_sync_quick(tmp_path):
    out = tmp_path / "avs.json"
    proc = subprocess.run([sys.executable, "-m", "tidal", "bench", "async-vs-sync", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["bench"] == "async-vs-sync" and set(report) == {"bench", "machine", "config", "results", "summary"}
    w, costs = report["config"]["workload"], report["config"]["cost_model"]
    rows = {r["mode"]: r for r in report["results"]}
    assert set(rows) == {"sync", "async"}
    assert rows["sync"]["max_staleness"] == 0 and rows["async"]["max_staleness"] == w["staleness"] > 0
    for r in rows.values():
        assert r["seconds_per_batch"] > 0 and 0 < r["utilization"] <= 1.05 and r["tokens_per_s"] > 0
        assert r["violations"] == 0  # the stand-in saw the engine keep the staleness budget
        # the stand-in's step took the scripted time per token: about the cost model's mean per batch
        assert r["train_s_per_batch"] == pytest.approx(costs["train_s_per_batch"], rel=0.5)
    assert rows["sync"]["stale"] == 0  # sync: every trajectory on-policy
    assert costs["train_s_per_batch"] == pytest.approx(w["train_fraction"] * costs["gen_s_per_batch"])
    s = report["summary"]
    assert s["speedup"] == pytest.approx(rows["sync"]["seconds_per_batch"] / rows["async"]["seconds_per_batch"])
    assert s["ideal_speedup"] == pytest.approx(rows["sync"]["seconds_per_batch"] / costs["gen_s_per_batch"])
    assert s["fraction_of_ideal"] == pytest.approx(s["speedup"] / s["ideal_speedup"])
    assert s["async_utilization"] == rows["async"]["utilization"] and s["sync_utilization"] == rows["sync"]["utilization"]
    # sync leaves the server idle while the trainer trains (0.8 of a batch's generation time)
    assert s["sync_utilization"] < 0.9
