"""`tidal bench learning --quick` through the real CLI: the report's schema, and figures that agree with
each other (no wall-clock limits: the machine is shared)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tidal.bench.learning import round_order, summarise

from tests.run.proc import descendants, survivors

SUMMARY = {"speedup", "final_success_async", "final_success_sync", "wall_s_async", "wall_s_sync", "target_met",
           "speedup_rounds"}


def test_abba_rounds_cancel_a_linear_drift_of_the_machine():
    """Sync takes 1.5x async's time on a machine that slows by 10% with each run. Over two rounds in ABBA
    order the summary's speed-up is the true 1.5; in the same order both rounds it would be 1.64."""
    def rows(order):
        return [{"round": r, "mode": mode, "wall_s": (150.0 if mode == "sync" else 100.0) * (1 + 0.1 * slot),
                 "final_success": 1.0 if mode == "sync" else 0.9375} for slot, (r, mode) in enumerate(order)]

    abba = [(r, mode) for r in range(2) for mode in round_order(r)]
    assert abba == [(0, "async"), (0, "sync"), (1, "sync"), (1, "async")]
    s = summarise(rows(abba))
    assert s["speedup"] == pytest.approx(1.5)
    assert s["speedup_rounds"] == pytest.approx([165 / 100, 180 / 130])
    assert s["wall_s_async"] == pytest.approx(115.0) and s["wall_s_sync"] == pytest.approx(172.5)
    assert s["final_success_async"] == 0.9375 and s["target_met"] is False  # 0.9375 < 0.95 x 1.0
    assert summarise(rows([(0, "async"), (0, "sync"), (1, "async"), (1, "sync")]))["speedup"] == pytest.approx(
        360 / 220)


@pytest.mark.slow
def test_bench_learning_quick(tmp_path):
    out = tmp_path / "learning.json"
    proc = subprocess.run([sys.executable, "-m", "tidal", "bench", "learning", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) == {"bench", "machine", "config", "results", "summary"} and report["bench"] == "learning"
    assert "inference.model.threads=1" in report["config"]["pinned"]
    assert "trainer.distributed.threads=1" in report["config"]["pinned"]
    assert report["config"]["rounds"] == 1  # --quick: one round
    rows = {r["mode"]: r for r in report["results"]}
    assert set(rows) == {"async", "sync"} and len(report["results"]) == 2
    assert {r["round"] for r in rows.values()} == {0}
    for r in rows.values():
        # --quick: 10 steps of 64 trajectories in both modes (async may drop a stale group member or two)
        assert r["steps"] == 10 and 0.9 * 640 <= r["trajectories"] <= 640
        assert r["wall_s"] > 0 and r["startup_s"] > 0 and 0 < r["train_s"] < r["wall_s"]
        assert 0 <= r["final_success"] <= 1 and r["final_version"] % 5 == 0 and r["final_version"] <= 10
        versions = [v for v, _, _ in r["curve"]]
        assert versions == sorted(versions) and versions[0] == 0  # the first evaluation is of version 0
        assert r["curve"][-1][0] == r["final_version"] and r["curve"][-1][2] == r["final_success"]
        assert r["curve"][0][2] == r["first_success"]
        assert r["seconds_to_0.9"] == next((t for _, t, success in r["curve"] if success >= 0.9), None)
        for child in ("server", "engine", "trainer"):
            assert r[f"{child}_cpu_share"] >= 0
    assert rows["sync"]["staleness_mean"] == 0  # sync: every token trained at the version that sampled it
    s = report["summary"]
    assert set(s) == SUMMARY
    assert s["speedup"] == pytest.approx(rows["sync"]["wall_s"] / rows["async"]["wall_s"])
    assert s["speedup_rounds"] == [pytest.approx(s["speedup"])]
    assert (s["wall_s_async"], s["wall_s_sync"]) == (rows["async"]["wall_s"], rows["sync"]["wall_s"])
    assert (s["final_success_async"], s["final_success_sync"]) == (rows["async"]["final_success"],
                                                                   rows["sync"]["final_success"])
    assert s["target_met"] == (s["final_success_async"] >= 0.95 * s["final_success_sync"]
                               and s["wall_s_async"] <= 2 / 3 * s["wall_s_sync"])
    assert "speedup" in proc.stdout


@pytest.mark.slow
def test_sigterm_to_bench_all_mid_run_leaves_no_process(tmp_path):
    """SIGTERM (what `timeout` and CI send) unwinds a bench like Ctrl-C: `tidal bench all` passes it to
    the bench, which stops its `tidal run`, which stops the server, engine and trainer. Before, the
    default action ended each parent at once and left the run training on its own."""
    proc = subprocess.Popen([sys.executable, "-m", "tidal", "bench", "all", "--only", "learning", "--quick",
                             "--out-dir", str(tmp_path / "out")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path)
    below: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 300
        while not any("-m tidal engine" in _cmdline(pid) for pid in descendants(proc.pid)):  # the run trains
            assert proc.poll() is None and time.monotonic() < deadline, "the run's engine never started"
            time.sleep(0.2)
        below = descendants(proc.pid)
        assert len(below) >= 5  # the bench, tidal run, server, trainer, engine (and the run's guard)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(200) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while survivors(below) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not survivors(below), [_cmdline(pid) for pid in survivors(below)]
    finally:
        for pid in [proc.pid, *survivors(below)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
