"""GPU-only tests (tests/gpu/run_on_device.sh runs them on a CUDA machine). Every module but
test_device_choice.py skips as a whole where CUDA is absent, before touching anything."""

import pytest


@pytest.fixture
def cuda_free_mib():
    """Free memory of GPU 0 in MiB right now (device-wide: other processes' use shows here too)."""
    import torch

    def read() -> float:
        free, _ = torch.cuda.mem_get_info(0)
        return free / 2**20

    return read


@pytest.fixture
def trainer_process(tmp_path):
    """`python -m tidal.trainer` children (tests/trainer/proc.py); every one still running at teardown is killed."""
    from tests.trainer.proc import TrainerProcess

    made = []

    def make(cfg: dict, **kw):
        made.append(TrainerProcess(tmp_path, cfg, **kw))
        return made[-1]

    yield make
    for proc in made:
        proc.stop()
