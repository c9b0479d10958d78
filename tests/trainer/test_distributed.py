"""The agreement after a step under torchrun (trainer/daemon.py `_step_together`, `World.reduce_step`), with
the other rank played by the all-reduce: it adds that rank's failure flag and metric shares to ours; and
`abort`, the end of a rank whose failure the others cannot agree on."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from trainer.daemon import _step_together
from trainer.distributed import ABORT_EXIT, SUMMED_METRICS, RanksDisagree, World
from trainer.learner import NonFiniteStep


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

    def train_step(self, batch):
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
    code = ("import threading, torch\nfrom trainer.distributed import abort\n"
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
