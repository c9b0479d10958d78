"""Smoke: `tidal bench backend --quick` runs as a subprocess and writes the report docs/performance.md fixes."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_backend_quick(tmp_path):
    out = tmp_path / "backend.json"
    proc = subprocess.run([sys.executable, "-m", "tidal", "bench", "backend", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["bench"] == "backend" and set(report) == {"bench", "machine", "config", "results", "summary"}
    cases = {(r["client"], r["concurrency"]) for r in report["results"]}
    assert cases == {(c, n) for c in ("tidal-sglang", "tidal-openai", "openai-pkg") for n in (1, 64, 1024)}
    for r in report["results"]:  # every stream was checked in full: count x tokens
        assert r["tokens"] == report["config"]["streams"][str(r["concurrency"])] * report["config"]["tokens"]
        assert r["cpu_us_per_token"] > 0 and r["cpu_us_per_request"] > 0
    s = report["summary"]
    assert s["cpu_ratio_vs_openai"] == pytest.approx(s["client_cpu_us_per_token_1024"] / s["openai_cpu_us_per_token_1024"])
