"""Smoke: `tidal bench engine --quick` runs as a subprocess and writes the report docs/performance.md
fixes, with numbers that hang together (no wall-clock limits: CPU and lag figures are only checked for
sanity)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_engine_quick(tmp_path):
    out = tmp_path / "engine.json"
    proc = subprocess.run([sys.executable, "-m", "tidal", "bench", "engine", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["bench"] == "engine" and set(report) == {"bench", "machine", "config", "results", "summary"}
    cpu = report["config"]["cpu"]
    rows = {(r["case"], r.get("tokens_per_event")): r for r in report["results"] if r["case"] != "hold"}
    assert set(rows) == {("engine", 1), ("floor", 1), ("engine", 16), ("floor", 16), ("turns", 16)}
    for (name, _), r in rows.items():  # every episode's every token arrived, checked by the bench
        tokens = cpu["turn_tokens"] if name == "turns" else cpu["tokens"]
        assert r["turns"] == cpu["episodes"] * cpu["turns"] and r["tokens"] == r["turns"] * tokens
        assert 0 < r["cpu_us_per_token"] < 1e5 and r["cpu_us_per_turn"] == pytest.approx(
            r["cpu_us_per_token"] * tokens)
    # 16 tokens per event costs less per token than 1, for the engine and the floor alike
    assert rows["engine", 16]["cpu_us_per_token"] < rows["engine", 1]["cpu_us_per_token"]
    assert rows["floor", 16]["cpu_us_per_token"] < rows["floor", 1]["cpu_us_per_token"]
    hold = [r for r in report["results"] if r["case"] == "hold"]
    assert [r["episodes"] for r in hold] == report["config"]["hold"]["levels"][:len(hold)]
    for r in hold:
        assert r["rss_mib"] >= r["idle_rss_mib"] > 10 and r["loop_lag_p90_ms"] >= 0
        assert r["held"] == (r["reached"] and r["loop_lag_p90_ms"] <= report["config"]["lag_limit_ms"])
    s = report["summary"]
    assert s["vs_parse_floor"] == pytest.approx(
        rows["engine", 16]["cpu_us_per_token"] / rows["floor", 16]["cpu_us_per_token"])
    assert s["engine_cpu_us_per_token"] == rows["engine", 16]["cpu_us_per_token"]
    held = [r for r in hold if r["held"]]
    assert s["max_concurrent_episodes"] == (held[-1]["episodes"] if held else 0)
    assert s["rss_mib_at_max"] == (held[-1]["rss_mib"] if held else 0.0)
