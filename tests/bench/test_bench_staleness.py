"""`tidal bench staleness --quick` through the real CLI: six cells, the staleness each measured within its
bound, a PNG of the curves, and a summary that repeats the rows."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_staleness_quick(tmp_path):
    out = tmp_path / "staleness.json"
    proc = subprocess.run([sys.executable, "-m", "tidal", "bench", "staleness", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) == {"bench", "machine", "config", "results", "summary"} and report["bench"] == "staleness"
    rows = {(r["max_staleness"], r["objective"]): r for r in report["results"]}
    assert set(rows) == {(s, o) for s in (0, 2, 8) for o in ("decoupled", "plain")}
    for (bound, objective), r in rows.items():
        assert r["steps"] == 5 and r["wall_s"] > 0 and 0 <= r["final_success"] <= 1
        # the trainer drops what is staler than its bound: no trained token is
        assert 0 <= r["staleness_mean"] <= r["staleness_max"] <= bound
        assert r["curve"][-1][2] == r["final_success"] and r["curve"][-1][0] == r["final_version"]
        s = report["summary"]
        assert s[f"final_success_s{bound}_{objective}"] == r["final_success"]
    assert report["config"]["cells"]["s0-plain"][-1] == "--sync"
    assert "trainer.learner.loss.proximal=behaviour" in report["config"]["cells"]["s8-plain"]
    png = tmp_path / "staleness.png"
    assert report["summary"]["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
