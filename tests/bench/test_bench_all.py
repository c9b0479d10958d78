"""`tidal bench all`: the report and the Markdown table it writes, a bench not built yet skipped, and the
README showing the table last committed in bench/results/latest.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tidal.bench import all as bench_all
from tidal.bench import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_all_quick_runs_the_named_benches_through_the_cli(tmp_path):
    out = tmp_path / "all.json"
    proc = subprocess.run([sys.executable, "-m", "tidal", "bench", "all", "--quick", "--only", "transport",
                           "--out-dir", str(tmp_path / "results"), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report == json.loads((tmp_path / "results" / "latest.json").read_text())
    assert report["bench"] == "all" and report["config"]["quick"] is True
    assert {"cpu", "cores", "python", "torch"} <= set(report["machine"])
    [row] = report["results"]
    assert row["bench"] == "transport" and row["status"] == "ok" and row["seconds"] > 0
    assert row["summary"]  # the bench's own summary, as its --json wrote it
    assert report["summary"] == {"ok": 1, "failed": 0, "skipped": 0}
    table = (tmp_path / "results" / "latest.md").read_text()
    assert table == bench_all.markdown(report)
    assert "| `transport` |" in table and report["machine"]["cpu"] in table


def test_a_bench_not_built_yet_is_skipped_and_said(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(cli.BENCHES, "nosuch", "tidal.bench.nosuch")
    assert bench_all.main(["--only", "nosuch", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "latest.json").read_text())
    assert report["results"] == [{"bench": "nosuch", "status": "skipped", "reason": "not built yet",
                                  "date": report["config"]["date"]}]
    assert report["summary"] == {"ok": 0, "failed": 0, "skipped": 1}
    assert "nosuch skipped" in capsys.readouterr().err
    assert "| `nosuch` | skipped: not built yet | - |" in (tmp_path / "latest.md").read_text()


def test_only_re_runs_some_rows_and_keeps_the_others_measured_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.setitem(cli.BENCHES, "nosuch", "tidal.bench.nosuch")
    latest = tmp_path / "latest.json"
    assert bench_all.main(["--only", "nosuch", "--out-dir", str(tmp_path)]) == 0
    earlier = json.loads(latest.read_text())
    kept = {"bench": "transport", "status": "ok", "seconds": 20.0, "summary": {"vs_raw_zmq_32k": 0.7},
            "date": "2026-01-02 03:04 UTC"}
    latest.write_text(json.dumps({**earlier, "results": [kept, *earlier["results"]]}))

    assert bench_all.main(["--only", "nosuch", "--out-dir", str(tmp_path)]) == 0
    report = json.loads(latest.read_text())
    assert [r["bench"] for r in report["results"]] == ["transport", "nosuch"]  # tidal bench's order
    assert report["results"][0] == kept and report["results"][1]["date"] == report["config"]["date"]
    assert report["summary"] == {"ok": 1, "failed": 0, "skipped": 1}
    table = (tmp_path / "latest.md").read_text()
    assert "| `transport` | vs_raw_zmq_32k 0.7 | 20 | 2026-01-02 03:04 UTC |" in table

    latest.write_text(json.dumps({**report, "machine": {**report["machine"], "cpu": "another CPU"}}))
    assert bench_all.main(["--only", "nosuch", "--out-dir", str(tmp_path)]) == 0
    assert [r["bench"] for r in json.loads(latest.read_text())["results"]] == ["nosuch"]  # not this machine's


def test_a_figure_drawn_beside_a_benchs_json_is_kept_in_the_out_dir(tmp_path):
    tmp, out = tmp_path / "tmp", tmp_path / "results"
    tmp.mkdir()
    (tmp / "staleness.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    summary = bench_all.keep_figure("staleness", tmp, out, {"final": 1.0, "png": str(tmp / "staleness.png")})
    assert summary == {"final": 1.0, "png": str(out / "staleness.png")}
    assert (out / "staleness.png").read_bytes().startswith(b"\x89PNG") and not (tmp / "staleness.png").exists()
    assert bench_all.keep_figure("transport", tmp, out, {"x": 1}) == {"x": 1}  # drew none: as it was


def test_readme_shows_the_latest_table():
    readme = (ROOT / "README.md").read_text()
    section = readme.split(bench_all.README_BEGIN, 1)[1].split(bench_all.README_END, 1)[0]
    assert section.strip() == (ROOT / "bench" / "results" / "latest.md").read_text().strip()
