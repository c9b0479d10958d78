"""The agreement after a step under torchrun (trainer/daemon.py `_step_together`, `World.reduce_step`), with
the other rank played by the all-reduce: it adds that rank's failure flag and metric shares to ours;
`abort`, the end of a rank whose failure the others cannot agree on; and the commands between ranks
when there is nothing to train: rank 0's IDLE (`World.keep_alive`, with `send` recorded) and how
ranks > 0 obey the commands (`_obey`, with `receive` scripted)."""

import asyncio
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tidal.trainer.daemon
import torch
from tidal.trainer.daemon import _obey, _step_together
from tidal.trainer.distributed import ABORT_EXIT, IDLE, STEP, STOP, SUMMED_METRICS, RanksDisagree, World
from tidal.trainer.learner import NonFiniteStep


class OtherRank(World):
    """Rank 1 of 2, whose all-reduce adds what rank 0 contributes: (failed, *SUMMED_METRICS)."""

    def __init__(self, failed: bool, shares=(0.0, 0.0, 0.0)):
        super().__init__(rank=1, size=2)
        self.other = np.array([float(failed), *shares])
        self.reduced: list[list[float]] = []

    def all_reduce(self, values):
        self.reduced.append(list(values))
        return np.asarray(values, dtype=np.float64) + self.other


class Learner:
    """A step that returns `metrics` or raises `exc`."""

    version = 7

    def __init__(self, metrics=None, exc=None):
        self.metrics, self.exc = metrics, exc
        self.batches = []

    def train_step(self, batch):
        self.batches.append(batch)
        if self.exc is not None:
            raise self.exc
        return dict(self.metrics)


MINE = {"trainer/loss": 0.25, "trainer/tokens": 30.0, "trainer/trained_tokens": 12.0, "trainer/grad_norm": 0.5}


def test_steps_that_succeed_everywhere_report_the_whole_steps_sums():
    assert SUMMED_METRICS == ("trainer/loss", "trainer/tokens", "trainer/trained_tokens")
    world = OtherRank(failed=False, shares=(0.5, 50.0, 20.0))
    metrics = _step_together(world, Learner(MINE), [])
    # summed shares 0.25 + 0.5, 30 + 50, 12 + 20; the global norm is the same on every rank: kept
    assert metrics == {"trainer/loss": 0.75, "trainer/tokens": 80.0, "trainer/trained_tokens": 32.0,
                       "trainer/grad_norm": 0.5}
    assert world.reduced == [[0.0, 0.25, 30.0, 12.0]], "one all-reduce: the flag and the summed metrics"


def test_a_non_finite_step_on_every_rank_is_skipped_by_each():
    world = OtherRank(failed=True)
    with pytest.raises(NonFiniteStep):
        _step_together(world, Learner(exc=NonFiniteStep("nan")), [])
    assert world.reduced == [[1.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("mine_failed", [True, False])
def test_ranks_that_disagree_on_a_non_finite_step_stop(mine_failed):
    learner = Learner(exc=NonFiniteStep("nan")) if mine_failed else Learner(MINE)
    with pytest.raises(RanksDisagree, match=f"non-finite on 1 of 2 ranks .*this rank: "
                                            f"{'skipped' if mine_failed else 'applied'}"):
        _step_together(OtherRank(failed=not mine_failed), learner, [])


def test_any_other_failure_skips_the_agreement_the_other_ranks_may_never_reach():
    world = OtherRank(failed=False)
    with pytest.raises(torch.OutOfMemoryError):
        _step_together(world, Learner(exc=torch.OutOfMemoryError("CUDA out of memory")), [])
    assert world.reduced == [], "no collective after a failure that may be this rank's alone"


def test_abort_names_rank_and_error_to_stderr_and_to_torchruns_error_file(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from tests.trainer.proc import ROOT

    error_file = tmp_path / "error.json"
    code = ("import threading, torch\nfrom tidal.trainer.distributed import abort\n"
            "threading.Thread(target=threading.Event().wait, daemon=False).start()  # a rank stuck in a collective\n"
            "try:\n    raise torch.OutOfMemoryError('CUDA out of memory (scripted)')\n"
            "except Exception as exc:\n    abort(1, 'step at version 3 failed', exc)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TORCHELASTIC_ERROR_FILE": str(error_file)})
    assert done.returncode == ABORT_EXIT, done.stderr
    assert ("tidal trainer: rank 1: step at version 3 failed: OutOfMemoryError: CUDA out of memory (scripted); "
            "ending the job") in done.stderr and "Traceback" in done.stderr
    failure = ProcessFailure(local_rank=1, pid=0, exitcode=ABORT_EXIT, error_file=str(error_file))  # torchrun's reading
    assert failure.message["message"] == "rank 1: step at version 3 failed: OutOfMemoryError: CUDA out of memory (scripted)"
    tb = failure.message["extraInfo"]["py_callstack"]
    assert tb.startswith("Traceback") and tb.endswith("torch.OutOfMemoryError: CUDA out of memory (scripted)\n")


# --- nothing to train: IDLE ---


class Sending(World):
    """Rank 0 of `size` whose `send` records the commands; `on_send(n)` runs after the n-th (in the
    thread `keep_alive` sends from)."""

    def __init__(self, size: int = 2, on_send=lambda n: None):
        super().__init__(rank=0, size=size)
        self.sent: list[int] = []
        self.on_send = on_send

    def send(self, command, batch=()):
        self.sent.append(command)
        self.sent_at = time.monotonic()
        self.on_send(len(self.sent))


def done_after(n: int) -> tuple[asyncio.Future, object]:
    """A future and an `on_send` that completes it with the n-th command sent."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    return done, lambda sent: sent == n and loop.call_soon_threadsafe(done.set_result, None)


async def test_rank_0_sends_idle_each_time_it_is_due_until_a_wait_ends():
    done, on_send = done_after(3)
    world = Sending(on_send=on_send)
    await asyncio.wait_for(world.keep_alive({done}, every_s=0.01), 30)
    assert world.sent == [IDLE] * 3, "nothing after the wait ended"


async def test_idle_is_due_every_s_after_the_last_command_not_after_the_wait_began():
    world = Sending()
    world.sent_at = time.monotonic()  # a command just went out: the other ranks have just begun to wait
    await world.keep_alive({asyncio.ensure_future(asyncio.sleep(0.2))}, every_s=60)
    assert world.sent == []
    done, world.on_send = done_after(1)
    world.sent_at = time.monotonic() - 59.5  # the last one a while ago: due in half a second, not in 60
    await asyncio.wait_for(world.keep_alive({done}, every_s=60), 30)
    assert world.sent == [IDLE]


async def test_one_process_only_waits():
    world = Sending(size=1)
    await world.keep_alive({asyncio.ensure_future(asyncio.sleep(0.1))}, every_s=0.001)
    assert world.sent == []


async def test_an_idle_cancelled_while_it_is_being_sent_is_waited_for():
    sending, release = threading.Event(), threading.Event()
    world = Sending(on_send=lambda n: (sending.set(), release.wait(30)))
    never = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(world.keep_alive({never}, every_s=60))  # no command yet: IDLE at once
    assert await asyncio.to_thread(sending.wait, 30)
    waiting.cancel()
    await asyncio.sleep(0.1)
    assert not waiting.done(), "a command sent now could overtake the IDLE still being broadcast"
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert world.sent == [IDLE]


class Receiving(OtherRank):
    """Rank 1 of 2 whose `receive` returns `script`'s commands in turn (or raises an exception there)."""

    def __init__(self, script):
        super().__init__(failed=False)
        self.script = list(script)

    def receive(self):
        got = self.script.pop(0)
        if isinstance(got, Exception):
            raise got
        return got


class Aborted(Exception):
    pass


@pytest.fixture
def aborts(monkeypatch):
    """`abort` raises Aborted((rank, what, error)) instead of ending the process."""
    def abort(rank, what, exc):
        raise Aborted(rank, what, f"{type(exc).__name__}: {exc}")

    monkeypatch.setattr(tidal.trainer.daemon, "abort", abort)


def test_ranks_wait_again_on_idle_and_train_on_step_until_stop():
    world = Receiving([(IDLE, []), (IDLE, []), (STEP, ["b0"]), (IDLE, []), (STOP, []), (STEP, ["after stop"])])
    learner = Learner(MINE)
    assert _obey(world, learner) == 0
    assert learner.batches == [["b0"]], "IDLE trains nothing"
    assert len(world.reduced) == 1, "IDLE joins no collective but the next receive"
    assert world.script == [(STEP, ["after stop"])]


@pytest.mark.parametrize(("got", "error"), [
    ((9, []), "TidalError: unknown command 9 from rank 0 (expected STEP 1, STOP 2, GATHER_WEIGHTS 3, "
              "GATHER_STATE 4 or IDLE 5)"),
    (RuntimeError("Timed out waiting 4000ms for recv operation to complete"),  # gloo's, rank 0 silent
     "RuntimeError: Timed out waiting 4000ms for recv operation to complete"),
])
def test_an_unknown_command_or_a_silent_rank_0_ends_the_job(aborts, got, error):
    with pytest.raises(Aborted) as ended:
        _obey(Receiving([(IDLE, []), got]), Learner(MINE))
    assert ended.value.args == (1, "waiting for rank 0's next command failed", error)
