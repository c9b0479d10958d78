"""What `tidal run` reads from the metrics files: lines only once complete, bad lines counted, the
staleness histogram's mean, the latest figures, forwarding to sinks; and the plots drawn from them."""

import json
import os
import subprocess
import sys

import pytest
from tidal.engine.plots import load, plot_run
from tidal.engine.runconsole import Status
from tidal.engine.runmetrics import JsonlTail, RunMetrics, staleness_mean

from tests.run.proc import NO_MATPLOTLIB, ROOT

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_line_is_read_once_it_is_complete(tmp_path):
    path = tmp_path / "m.jsonl"
    tail = JsonlTail(path)
    assert tail.read() == []  # not there yet
    path.write_bytes(b'{"a": 1}\n{"b"')
    assert tail.read() == [{"a": 1}]
    with open(path, "ab") as f:
        f.write(b': 2}\nnot json\n[1]\n{"c": 3}\n')
    assert tail.read() == [{"b": 2}, {"c": 3}]
    assert tail.bad_lines == 2  # "not json" and a list are skipped and counted
    path.write_bytes(b'{"d": 4}\n')  # a new, shorter file: read from its start
    assert tail.read() == [{"d": 4}]


def test_staleness_mean_of_the_histogram():
    # 6 trajectories 0 versions old, 3 one version old, 1 three versions old: (0*6 + 1*3 + 3*1) / 10 = 0.6
    assert staleness_mean({"engine/staleness/0": 6, "engine/staleness/1": 3, "engine/staleness/3": 1,
                           "engine/reward_mean": 0.5}) == pytest.approx(0.6)
    assert staleness_mean({"engine/reward_mean": 0.5}) is None


class Recorder:
    """A metrics sink that keeps what it is given (the interface WandbSink and TensorBoardSink have)."""

    name = "recorder"

    def __init__(self, fail_after: int | None = None):
        self.got, self.fail_after, self.closed = [], fail_after, False

    def log(self, source, record, started):
        if self.fail_after is not None and len(self.got) >= self.fail_after:
            raise OSError("disk full")
        self.got.append((source, record))

    def close(self):
        self.closed = True


def _write(path, *records):
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_latest_figures_steps_and_forwarding(tmp_path):
    engine, trainer = tmp_path / "engine.jsonl", tmp_path / "trainer.jsonl"
    good, bad = Recorder(), Recorder(fail_after=1)
    m = RunMetrics(engine, trainer, sinks=[good, bad])
    _write(trainer, {"step": 0, "time": 1.0, "event": "ready", "endpoint": "tcp://127.0.0.1:9"},
           {"step": 0, "time": 2.0, "event": "step", "trainer/loss": 0.5, "ids": "a,b"},
           {"step": 1, "time": 3.0, "event": "step", "trainer/loss": 0.25, "ids": "c,d"})
    _write(engine, {"step": 1, "time": 2.5, "engine/staleness/0": 2, "engine/staleness/2": 2,
                    "engine/reward_mean": 0.1})
    assert len(m.poll()) == 4
    assert m.steps == 2 and m.latest["trainer/loss"] == 0.25
    assert m.latest["engine/staleness_mean"] == pytest.approx(1.0)
    assert [e["event"] for e in m.events["trainer"]] == ["ready"]
    _write(engine, {"step": 2, "time": 4.0, "engine/staleness/1": 4})  # a new histogram replaces the old
    m.poll()
    assert "engine/staleness/2" not in m.latest and m.latest["engine/staleness_mean"] == pytest.approx(1.0)
    _write(engine, {"step": 2, "time": 4.5, "event": "eval", "engine/eval/success": 0.75})
    m.poll()
    assert m.latest["engine/eval/success"] == 0.75 and m.events["engine"][-1]["event"] == "eval"
    _write(trainer, {"step": 1, "time": 5.0, "event": "resume"})
    m.poll()
    assert m.steps == 1  # a trainer restored from an older checkpoint is at its version again
    assert len(good.got) == 7 and bad not in m.sinks  # a failing sink is dropped, the others go on
    status = Status(90.0, m.steps, 20, 15.0, m.latest, [("trainer", "pid 7")])
    assert "1.5/15 min" in status.line() and "step 1/20" in status.line()
    m.close()
    assert good.closed


def _fake_run(run_dir, eval_success: bool):
    metrics = run_dir / "metrics"
    metrics.mkdir(parents=True)
    for k in range(6):
        _write(metrics / "engine.jsonl", {"step": k, "time": 100.0 + 10 * k, "engine/reward_mean": 0.1 * k,
                                          "engine/tokens_per_s": 50.0, "engine/staleness/0": 3,
                                          "engine/staleness/1": 1})
        if eval_success:  # as the engine's eval pass writes them
            _write(metrics / "engine.jsonl", {"step": k, "time": 101.0 + 10 * k, "event": "eval",
                                              "engine/eval/success": k / 5})
        _write(metrics / "trainer.jsonl", {"step": k, "time": 105.0 + 10 * k, "event": "step",
                                           "trainer/reward_mean": 0.1 * k, "trainer/tokens_per_s": 900.0,
                                           "trainer/staleness_mean": 0.5, "trainer/trajectory_staleness_max": 1})
    # a resume re-ran step 4: its later record wins
    _write(metrics / "trainer.jsonl", {"step": 4, "time": 200.0, "event": "resume"},
           {"step": 4, "time": 201.0, "event": "step", "trainer/reward_mean": 9.0})


def test_plots_from_the_metrics_files(tmp_path):
    _fake_run(tmp_path, eval_success=True)
    series = load(tmp_path)
    assert [r["step"] for r in series.steps] == [0, 1, 2, 3, 4, 5]
    assert series.trainer_xy("trainer/reward_mean")[1][4] == 9.0
    assert series.engine_xy("engine/staleness_mean")[1][0] == pytest.approx(0.25)
    assert series.engine_xy("engine/eval/success", x="step") == ([0, 1, 2, 3, 4, 5], [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    written = plot_run(tmp_path)
    assert {p.name for p in written} == {"reward.png", "success.png", "throughput.png", "staleness.png"}
    for p in written:
        assert p.read_bytes()[:8] == PNG


def test_no_eval_records_no_success_plot_and_the_command_line(tmp_path):
    _fake_run(tmp_path, eval_success=False)
    out = subprocess.run([sys.executable, "-m", "tidal.engine.plots", str(tmp_path)], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == ["reward.png", "staleness.png",
                                                                         "throughput.png"]


def test_without_matplotlib_the_plots_say_so_in_one_line(tmp_path):
    _fake_run(tmp_path, eval_success=False)
    out = subprocess.run([sys.executable, "-m", "tidal.engine.plots", str(tmp_path)], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(NO_MATPLOTLIB)})
    assert out.returncode == 3 and out.stderr.strip().splitlines() == [
        "matplotlib is not installed (pip install 'tidal[train]'): no plots"]
    assert not (tmp_path / "plots").exists()


def test_wandb_offline_needs_no_network(tmp_path):
    pytest.importorskip("wandb")
    from tidal.engine.runconfig import WandbConfig
    from tidal.engine.runmetrics import WandbSink

    sink = WandbSink(WandbConfig(mode="offline", name="t"), tmp_path, {"max_steps": 3})
    sink.log("engine", {"step": 0, "time": 10.0, "engine/reward_mean": 0.5}, 0.0)
    sink.log("trainer", {"step": 0, "time": 11.0, "event": "step", "trainer/loss": 0.25, "ids": "a"}, 0.0)
    sink.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tidal.engine.runmetrics import TensorBoardSink

    sink = TensorBoardSink(tmp_path)
    sink.log("trainer", {"step": 3, "time": 11.0, "event": "step", "trainer/loss": 0.25}, 0.0)
    sink.log("engine", {"step": 3, "time": 70.0, "engine/tokens_per_s": 40.0}, 10.0)
    sink.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("trainer/loss")] == [(3, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("engine/tokens_per_s")] == [(60, 40.0)]  # 70 - 10 s
