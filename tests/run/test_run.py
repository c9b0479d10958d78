"""`tidal run` end to end over real processes on the tiny model: the run dir it leaves, a resume, the
synchronous variant, children killed with SIGKILL and restarted, a restart limit that stops the run
cleanly, and a start-up error that starts nothing."""

import os
import signal
import socket
import tomllib

import pytest
from tidal.engine.runconfig import RunConfig
from tidal.protocol.config import load_config

from tests.run.proc import FAKE_SGLANG, NO_MATPLOTLIB, read_jsonl, run_toml, survivors, wait_until

pytestmark = pytest.mark.slow

PNG = b"\x89PNG\r\n\x1a\n"


def _last_step(run) -> int:
    return max((r["step"] for r in run.steps()), default=-1)


def test_a_run_leaves_everything_in_its_run_dir_and_resumes(runs, tiny_model_dir):
    run = runs(run_toml(tiny_model_dir, max_steps=3, plots={"enabled": True, "every_s": 0.0}))
    assert run.wait(300) == 0, run.logs()
    root = run.run_dir
    assert load_config(RunConfig, root / "config.toml").run_dir == str(root)  # the resolved config reads back
    assert {p.name for p in (root / "logs").glob("*.log")} >= {"server.log", "trainer.log", "engine.log"}
    assert {p.name for p in (root / "configs").glob("*.toml")} == {"server.toml", "trainer.toml", "engine.toml"}
    trainer = tomllib.loads((root / "configs" / "trainer.toml").read_text())
    engine = tomllib.loads((root / "configs" / "engine.toml").read_text())
    assert engine["trainer"]["endpoint"] == trainer["intake"]["endpoint"] != "tcp://127.0.0.1:0"
    assert [r["step"] for r in run.steps()] == [0, 1, 2]
    assert read_jsonl(root / "metrics" / "engine.jsonl")
    assert (root / "checkpoints" / "step-00000003").is_dir() and list((root / "weights").glob("v*"))
    plots = {p.name: p.read_bytes()[:8] for p in (root / "plots").glob("*.png")}
    assert {"reward.png", "throughput.png", "staleness.png"} <= set(plots) and set(plots.values()) == {PNG}
    started = [e["child"] for e in run.events("started")]
    assert started[:3] == ["server", "trainer", "engine"], started
    assert [e["child"] for e in run.events("stopped")] == ["engine", "trainer", "server"]
    assert "max_steps" in run.events("finished")[0]["reason"]
    assert "step 3/3" in run.output()

    again = runs(run_toml(tiny_model_dir, max_steps=5), name="run")  # the same run dir: it resumes
    assert again.wait(300) == 0, again.logs()
    assert "resuming the run in" in again.output()
    resumed = [r for r in read_jsonl(root / "metrics" / "trainer.jsonl") if r.get("event") == "resume"]
    assert resumed and resumed[-1]["step"] == 3
    assert _last_step(again) == 4


def test_sync_runs_the_same_experiment_with_synchronous_rollouts(runs, tiny_model_dir):
    """Also: without matplotlib, plotting every second, the run warns once and goes on."""
    run = runs(run_toml(tiny_model_dir, max_steps=3, plots={"enabled": True, "every_s": 1.0}), args=["--sync"],
               env={"PYTHONPATH": str(NO_MATPLOTLIB)})
    assert run.wait(300) == 0, run.logs()
    assert run.output().count("matplotlib is not installed") == 1
    assert not (run.run_dir / "plots").exists()
    engine = tomllib.loads((run.run_dir / "configs" / "engine.toml").read_text())
    trainer = tomllib.loads((run.run_dir / "configs" / "trainer.toml").read_text())
    assert engine["rollout"]["mode"] == "sync" and trainer["intake"]["max_staleness"] == 0
    assert load_config(RunConfig, run.run_dir / "config.toml").sync
    steps = run.steps()
    assert len(steps) == 3 and all(r["trainer/trajectory_staleness_max"] == 0 for r in steps)


@pytest.mark.timeout(900)  # its own waits fail first, with the run's logs
def test_every_child_killed_with_sigkill_is_restarted_and_the_run_finishes(runs, tiny_model_dir):
    cfg = run_toml(tiny_model_dir, max_steps=12, trainer={"intake": {"batch_size": 8, "group_size": 4},
                                                          "checkpoint": {"every_steps": 2}})
    run = runs(cfg)
    for name in ("engine", "trainer", "server"):
        before = _last_step(run)
        run.wait_for(lambda: _last_step(run) > before, 240, f"a step before killing the {name}")  # noqa: B023
        os.kill(run.child_pid(name), signal.SIGKILL)
        run.wait_for(lambda: run.events("restarted", child=name), 240, f"the {name} restarted")  # noqa: B023
        died = run.events("died", child=name)
        assert len(died) == 1 and died[0]["code"] == -signal.SIGKILL
        assert f"{name} (pid" in run.output() and f"restarting {name} (1 of 3)" in run.output()
    assert run.wait(400) == 0, run.logs()
    assert _last_step(run) == 11
    assert run.events("started", child="server")[-1]["start"] == 2
    server_cfg = tomllib.loads((run.run_dir / "configs" / "server.toml").read_text())
    assert "/weights/v" in server_cfg["model"]["path"]  # the restarted server came back with the trainer's weights
    assert server_cfg["server"]["weight_version"] == server_cfg["model"]["path"].rsplit("/v", 1)[1].lstrip("0")


def _free_port() -> int:
    """A port free now. SGLang cannot bind port 0 and report it, so its launch takes a fixed port; the
    race with another process taking it meanwhile is the price of testing that path."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_sglang_server_is_launched_probed_and_restarted_at_the_trainers_version(runs, tiny_model_dir):
    """SGLang's command line, readiness by /model_info and a restart with --weight-version, through a
    stand-in `sglang.launch_server` that runs the reference server with the same arguments."""
    cfg = run_toml(tiny_model_dir, max_steps=6, inference={"type": "sglang", "port": _free_port()})
    run = runs(cfg, env={"PYTHONPATH": str(FAKE_SGLANG)})
    run.wait_for(lambda: _last_step(run) >= 1, 240, "two trainer steps")
    os.kill(run.child_pid("server"), signal.SIGKILL)
    run.wait_for(lambda: run.events("restarted", child="server"), 240, "the server restarted")
    assert run.wait(300) == 0, run.logs()
    starts = [line for line in (run.run_dir / "logs" / "server.log").read_text().splitlines()
              if line.startswith("fake sglang:")]
    assert len(starts) == 2, starts
    assert f"--model-path {tiny_model_dir} " in starts[0] and "--weight-version" not in starts[0]
    assert "/weights/v" in starts[1] and "--weight-version " in starts[1]
    assert _last_step(run) == 5


def test_past_the_restart_limit_the_run_stops_cleanly(runs, tiny_model_dir):
    run = runs(run_toml(tiny_model_dir, max_steps=0, restart={"max_restarts": 0, "stop_timeout_s": 60.0}))
    run.wait_for(lambda: run.steps(), 240, "a trainer step")
    procs = run.tree()
    os.kill(run.child_pid("engine"), signal.SIGKILL)
    assert run.wait(180) == 1, run.logs()
    wait_until(lambda: not survivors(procs), 30, "no survivor")
    failed = run.events("failed")
    assert failed and "engine" in failed[0]["error"] and "killed by SIGKILL" in failed[0]["error"]
    assert "restart.max_restarts = 0" in run.output()
    assert [e["child"] for e in run.events("stopped")] == ["engine", "trainer", "server"]


def test_a_run_whose_trainer_takes_no_step_fails_saying_what_the_engine_last_reported(runs, tiny_model_dir):
    """The engine stopped (SIGSTOP) sends nothing, so the trainer steps no more: after
    restart.stall_timeout_s the run fails instead of hanging, and stops every child, the stopped one too."""
    run = runs(run_toml(tiny_model_dir, max_steps=0, restart={"stall_timeout_s": 4.0, "stop_timeout_s": 60.0}))
    run.wait_for(lambda: run.steps(), 240, "a trainer step")
    procs = run.tree()
    os.kill(run.child_pid("engine"), signal.SIGSTOP)
    assert run.wait(180) == 1, run.logs()
    wait_until(lambda: not survivors(procs), 30, "no survivor")
    error = run.events("failed")[0]["error"]
    assert "no trainer step for 4 s (restart.stall_timeout_s)" in error and "episodes_started" in error, error
    assert [e["child"] for e in run.events("stopped")] == ["engine", "trainer", "server"]
    assert run.events("stopped", child="engine")[0]["code"] == 0  # SIGCONT with its SIGTERM: it drained


def test_a_bad_env_id_fails_before_anything_starts(runs, tiny_model_dir):
    run = runs(run_toml(tiny_model_dir, engine={"tasks": [{"env": "games:NoSuchGame-v0"}]}))
    assert run.wait(120) == 2
    assert "tasks[0].env" in run.output() and "NoSuchGame" in run.output()
    assert not run.events("started")


def test_max_minutes_counts_from_the_start_and_ends_the_run_cleanly(runs, tiny_model_dir):
    """Even a server that never gets ready: the wall-clock limit ends the run, exit code 0."""
    cfg = run_toml(tiny_model_dir, max_steps=0, max_minutes=0.25,
                   inference={"type": "sglang", "port": 1, "args": ["--fake-hang"]},
                   restart={"stop_timeout_s": 2.0, "ready_timeout_s": 600.0})
    run = runs(cfg, env={"PYTHONPATH": str(FAKE_SGLANG)})
    log = run.run_dir / "logs" / "server.log"
    run.wait_for(lambda: log.exists() and "worker pid" in log.read_text(), 60, "the stand-in server")
    procs = run.tree()
    assert run.wait(120) == 0, run.logs()
    assert "max_minutes (0.25) reached" in run.events("finished")[0]["reason"]
    wait_until(lambda: not survivors(procs), 30, "no survivor")
