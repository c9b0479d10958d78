"""Smoke the real entry point: `tidal bench soak --quick` kills a server, the engine and the trainer of a
running pipeline, and the ledger the processes wrote shows no trajectory lost."""

import json
import subprocess
import sys

from tidal.bench.soak import growth, ledger


def test_bench_soak_quick_loses_nothing(tmp_path):
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, "-m", "tidal", "bench", "soak", "--quick", "--json", str(out)],
                         capture_output=True, text=True, timeout=400)
    assert out.exists(), run.stderr[-4000:]
    report = json.loads(out.read_text())
    s = report["summary"]
    assert s["lost"] == 0 and report["lost_ids"] == [], (report["lost_ids"], run.stderr[-4000:])
    assert s["faults_injected"] >= 3 and s["faults_by_kind"].keys() == {"server", "engine", "trainer"}
    assert s["produced"] > 0 and s["trained"] > 0
    accounted = s["trained"] + s["dropped_stale"] + s["rejected"] + s["dead_lettered"] + s["pending"] + s["lost"]
    assert s["balanced"] and accounted == s["produced"] and s["delivered"] <= s["produced"]
    assert s["trained_twice"] == 0 and s["unplanned_exits"] == 0 and s["hangs"] == 0, report["unplanned_exits"]
    assert {r["process"] for r in report["results"]} == {"server-0", "server-1", "engine", "trainer"}
    assert all(r["rss_samples"] > 0 for r in report["results"]) and s["rss_growth_ratio"] > 0 < s["rss_growth_in_life"]
    assert all(r["exit"] == "exit code 0" for r in report["results"]), report["results"]
    assert run.returncode == 0, run.stderr[-4000:]


def test_the_ledger_follows_resumes_and_counts_each_fate_once():
    """Worked by hand: a..f produced. The trainer trains a, b at v0 and c, d at v1, drops e as stale at
    v2, then resumes at v1: the v1 step and the v2 drop are undone. After the resume it trains c at v1;
    d waits in its checkpoint; f is named nowhere: lost."""
    engine = [{"event": "spooled", "ids": "a,b"}, {"event": "spooled", "ids": "c,d"}, {"event": "spooled", "ids": "e,f"}]
    trainer = [
        {"event": "step", "step": 0, "ids": "a,b"}, {"event": "step", "step": 1, "ids": "c,d"},
        {"event": "dropped", "step": 2, "stale": "e", "rejected": ""},
        {"event": "resume", "step": 1},
        {"event": "step", "step": 1, "ids": "c"},
    ]
    book = ledger(engine, trainer, buffered={"d"}, spooled=set())
    assert (book["produced"], book["trained"], book["dropped_stale"], book["pending"]) == (6, 3, 0, 1)
    assert book["lost"] == 2 and book["lost_ids"] == ["e", "f"] and book["balanced"]
    book = ledger(engine, [*trainer, {"event": "dropped", "step": 1, "stale": "e", "rejected": ""}],
                  buffered={"d"}, spooled={"f"})
    assert (book["dropped_stale"], book["pending"], book["lost"], book["delivered"]) == (1, 2, 0, 5)


def test_growth_compares_the_first_and_last_windows():
    samples = [(t, 100.0) for t in range(10)] + [(t, 130.0) for t in range(10, 20)]
    assert growth(samples, window_s=4) == 1.3 and growth(samples[:10], window_s=4) == 1.0
