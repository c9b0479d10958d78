"""`tidal bench trainer --quick` runs as a subprocess and writes the report docs/performance.md fixes."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_trainer_quick(tmp_path):
    out = tmp_path / "trainer.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tidal", "bench", "trainer", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["bench"] == "trainer" and report["config"]["quick"] is True
    assert {"cpu", "cores", "python", "torch"} <= set(report["machine"])
    summary = report["summary"]
    cases = {row["case"]: row for row in report["results"]}
    assert set(cases) == {"train/pack", "train/pack_one_row", "train/pad", "publish/disk", "publish/gloo"}
    assert "error" not in cases["publish/gloo"], cases["publish/gloo"]
    # packing wastes far fewer slots than padding a long-tailed mix, and both trained every token
    assert summary["padding_fraction"] < 0.15 < summary["naive_padding_fraction"]
    assert summary["packing_speedup"] > 0 and summary["train_tokens_per_s"] > 0
    assert summary["publish_ms_per_mb_disk"] > 0 and summary["publish_ms_per_mb_gloo"] > 0
    assert "packing_speedup" in proc.stdout
