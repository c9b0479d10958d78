"""engine/supervise.py and engine/guard.py over real processes: a child dies with its parent (the death
signal), its own subprocesses die too (the guard), and a stop escalates from SIGTERM to SIGKILL of
the whole process group."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from tidal.engine.guard import SCAN_S
from tidal.engine.supervise import Child, Guard, describe_exit, pdeathsig_supported

from tests.run.proc import ROOT, descendants, survivors, wait_until

STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(3600)"
"""A child that ignores SIGTERM."""
WITH_WORKER = ("import subprocess, sys, time; w = subprocess.Popen([sys.executable, '-c', 'import time; "
               "time.sleep(3600)']); print('worker', w.pid, flush=True); time.sleep(3600)")
"""A child with a subprocess of its own (in its process group)."""
WITH_SESSION_WORKER = WITH_WORKER.replace("time.sleep(3600)'])", "time.sleep(3600)'], start_new_session=True)")
"""A child whose subprocess leaves its process group (a session of its own, as torchrun's ranks)."""


def test_stop_escalates_to_sigkill_of_the_whole_group(tmp_path):
    child = Child("stubborn", [sys.executable, "-c", WITH_WORKER.replace("import subprocess",
                  "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); import subprocess")],
                  tmp_path / "stubborn.log")
    child.start()
    wait_until(lambda: "worker" in child.output(), 30, "the worker")
    workers = descendants(child.pid)
    assert len(workers) == 1
    code = child.stop(deadline_s=0.5)
    assert code == -signal.SIGKILL and describe_exit(code) == "killed by SIGKILL"
    wait_until(lambda: not survivors(workers), 10, "the worker to die with its group")


def test_a_child_that_exits_on_sigterm_is_not_killed(tmp_path):
    child = Child("polite", [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(3600)"],
                  tmp_path / "polite.log")
    child.start()
    wait_until(lambda: "up" in child.output(), 30, "the child")
    assert child.stop(deadline_s=30) == -signal.SIGTERM


def test_the_log_keeps_every_start_and_the_tail_is_the_latest(tmp_path):
    child = Child("echo", [sys.executable, "-c", "print('first')"], tmp_path / "echo.log")
    child.start()
    child.proc.wait(30)
    child.argv = [sys.executable, "-c", "print('second'); raise SystemExit(3)"]
    child.start()
    assert child.proc.wait(30) == 3 and child.poll() == 3 and child.starts == 2
    log = (tmp_path / "echo.log").read_text()
    assert "echo start 1" in log and "first" in log and "echo start 2" in log
    assert child.tail() == "second" and "first" not in child.output()


PARENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tidal.engine.supervise import Child, Guard
    guard = Guard()
    tmp = Path(sys.argv[1])
    children = [Child(f"c{i}", [sys.executable, "-c", sys.argv[2]], tmp / f"c{i}.log") for i in range(2)]
    for c in children:
        c.start()
        guard.watch(c)
    print("started", flush=True)
    time.sleep(3600)
""")


@pytest.mark.skipif(not pdeathsig_supported(), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("body", [STUBBORN, WITH_WORKER, WITH_SESSION_WORKER],
                         ids=["stubborn", "with-worker", "with-worker-in-its-own-session"])
def test_a_sigkilled_parent_takes_its_children_and_their_subprocesses_down(tmp_path, body):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), body], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "started"
        wait_until(lambda: all((tmp_path / f"c{i}.log").read_text().count("\n") >= 2 for i in range(2)), 30,
                   "the children to be up")
        if body is WITH_SESSION_WORKER:
            time.sleep(2 * SCAN_S)  # out of its parent's group, a subprocess is the guard's once it was scanned
        procs = descendants(parent.pid)
        assert len(procs) >= 3  # the guard and two children (and, with-worker, two workers)
        parent.kill()
        parent.wait(30)
        wait_until(lambda: not survivors(procs), 30, f"no survivor among {sorted(procs)}")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_the_guard_listens_before_the_first_child_starts():
    guard = Guard()
    try:
        # Guard() returned, so the guard already ignores a terminal's signals: nothing of its start-up is left
        os.kill(guard.proc.pid, signal.SIGINT)
        time.sleep(2 * SCAN_S)
        assert guard.proc.poll() is None
    finally:
        guard.close()
    assert guard.proc.returncode == 0


def test_a_child_dead_before_the_guard_read_its_pid_still_has_its_group_killed(tmp_path):
    guard = Guard()
    child = Child("short-lived", [sys.executable, "-c", WITH_WORKER], tmp_path / "short.log")
    child.start()
    try:
        wait_until(lambda: "worker" in child.output(), 30, "the worker")
        workers = descendants(child.pid)
        assert len(workers) == 1
        os.kill(child.pid, signal.SIGKILL)  # the child alone: its worker stays, in the child's group
        child.proc.wait(30)
        assert child.poll() == -signal.SIGKILL and survivors(workers)
        guard.watch(child)
        guard.close()
        wait_until(lambda: not survivors(workers), 10, "the worker to die with its group")
    finally:
        child.kill()
        guard.close()
