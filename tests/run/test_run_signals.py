"""`tidal run` never leaves a child behind: SIGTERM, SIGINT and SIGKILL to the parent in three states
(building the model, a server that is still starting, training), checked against /proc."""

import signal

import pytest

from tests.run.proc import FAKE_SGLANG, RunProcess, run_toml, survivors, wait_until

pytestmark = pytest.mark.slow

STOPPED_S = 30
"""How long the kernel and the stop sequence get before a survivor counts as an orphan."""


def _none_survive(run: RunProcess, procs: dict[int, int]) -> None:
    wait_until(lambda: not survivors(procs), STOPPED_S, f"no survivor among {sorted(procs)}\n{run.logs()}")


def _starting_run(runs, tiny_model_dir) -> RunProcess:
    """A run whose server never gets ready (the stand-in sglang ignores SIGTERM, has a subprocess)."""
    cfg = run_toml(tiny_model_dir, inference={"type": "sglang", "port": 1, "args": ["--fake-hang"]},
                   restart={"stop_timeout_s": 2.0, "ready_timeout_s": 600.0})
    run = runs(cfg, env={"PYTHONPATH": str(FAKE_SGLANG)})
    log = run.run_dir / "logs" / "server.log"
    # no pause for the guard's next scan: the subprocess is in its parent's process group, which the
    # guard kills whole, however new its members are
    run.wait_for(lambda: log.exists() and "worker pid" in log.read_text(), 60, "the stand-in server's subprocess")
    return run


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_while_the_server_starts_leaves_no_child(runs, tiny_model_dir, sig):
    run = _starting_run(runs, tiny_model_dir)
    procs = run.tree()
    assert not run.events("ready")
    run.proc.send_signal(sig)
    code = run.wait(60)
    _none_survive(run, procs)
    if sig != signal.SIGKILL:
        assert code == 128 + sig, run.logs()
        assert run.events("stopped", child="server")  # SIGTERM ignored, then SIGKILL: it was stopped


def test_a_second_ctrl_c_kills_at_once(runs, tiny_model_dir):
    cfg = run_toml(tiny_model_dir, inference={"type": "sglang", "port": 1, "args": ["--fake-hang"]},
                   restart={"stop_timeout_s": 600.0})  # the first Ctrl-C alone would wait ten minutes
    run = runs(cfg, env={"PYTHONPATH": str(FAKE_SGLANG)})
    log = run.run_dir / "logs" / "server.log"
    run.wait_for(lambda: log.exists() and "worker pid" in log.read_text(), 60, "the stand-in server's subprocess")
    procs = run.tree()
    run.proc.send_signal(signal.SIGINT)
    run.wait_for(lambda: "stopping server" in run.output(), 30, "the stop to begin")
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(60) == 128 + signal.SIGINT
    _none_survive(run, procs)


def test_sigkill_while_the_model_builds_leaves_no_child(runs, tiny_model_dir):
    cfg = run_toml(tiny_model_dir, model={"path": "", "build_tiny": True})
    run = runs(cfg)
    run.wait_for(lambda: (run.run_dir / "logs" / "model.log").exists() and run.tree(), 60, "the build step")
    procs = run.tree()
    run.proc.send_signal(signal.SIGKILL)
    run.wait(30)
    _none_survive(run, procs)
    assert not (run.run_dir / "model").exists()  # a build cut short leaves no model a resume would trust


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_while_training_leaves_no_child(runs, tiny_model_dir, sig):
    run = runs(run_toml(tiny_model_dir, max_steps=0))
    run.wait_for(lambda: run.steps(), 240, "a trainer step")
    procs = run.tree()
    assert len(procs) >= 3  # server, trainer, engine
    run.proc.send_signal(sig)
    code = run.wait(180)
    _none_survive(run, procs)
    if sig == signal.SIGKILL:
        return
    assert code == 128 + sig, run.logs()
    stopped = run.events("stopped")
    assert [e["child"] for e in stopped] == ["engine", "trainer", "server"]  # reverse start order
    assert all(e["code"] == 0 for e in stopped), stopped  # each drained or checkpointed, then exited 0
    trainer = [r for r in (run.run_dir / "metrics" / "trainer.jsonl").read_text().splitlines() if '"checkpoint"' in r]
    assert trainer, "the trainer wrote no checkpoint on SIGTERM"
