"""Where `World.init` puts a trainer rank: "auto" never mixes devices or doubles ranks up on a GPU,
and "cuda" without a GPU for this rank is a ConfigError that names the numbers. Runs on every machine."""

import pytest

torch = pytest.importorskip("torch")

from tidal.protocol.errors import ConfigError  # noqa: E402
from tidal.trainer.distributed import World  # noqa: E402


def init(monkeypatch, device: str, local_rank: int, local_ranks: int) -> World:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    world = World(local_rank=local_rank)      # size 1: no process group is formed
    world.init("gloo", device)
    return world


def test_auto_takes_each_ranks_gpu_only_when_every_local_rank_has_one(monkeypatch):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert init(monkeypatch, "auto", 0, max(gpus, 1)).device == ("cuda:0" if gpus else "cpu")
    assert init(monkeypatch, "auto", 0, gpus + 1).device == "cpu"


def test_cuda_for_a_rank_without_a_gpu_names_the_rank_and_the_count(monkeypatch):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=rf"local rank {gpus} of {gpus + 1} has no GPU \({gpus} visible\)"):
        init(monkeypatch, "cuda", gpus, gpus + 1)
    assert init(monkeypatch, "cpu", gpus, gpus + 1).device == "cpu"
