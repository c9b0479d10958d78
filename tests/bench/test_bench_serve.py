"""Smoke the real entry point: `tidal bench serve --quick` writes the docs/performance.md report shape."""

import json
import subprocess
import sys


def test_bench_serve_quick(tmp_path):
    out = tmp_path / "serve.json"
    subprocess.run([sys.executable, "-m", "tidal", "bench", "serve", "--quick", "--json", str(out)],
                   check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    assert set(report) == {"bench", "machine", "config", "results", "summary"} and report["bench"] == "serve"
    assert {(r["mode"], r["concurrency"]) for r in report["results"]} == {
        ("fast", 64), ("fast", 256), ("h100", 64), ("h100", 256)}
    assert all(r["tokens"] == r["concurrency"] * 16 for r in report["results"])
    summary = report["summary"]
    assert summary["server_cpu_us_per_token_256"] > 0 and 0 < summary["sim_gpu_utilisation_256"] <= 1.05
