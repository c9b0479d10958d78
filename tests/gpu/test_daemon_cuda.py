"""`tidal trainer` end to end on CUDA in bf16: fed over the real trajectory channel, it trains on the GPU,
checkpoints each step, broadcasts each version into a `tidal serve` on the same GPU (gloo; an engine
side, tests/trainer/engine_side.py, has the server receive what the status channel announces), and
after SIGTERM a second run resumes on the GPU from the checkpoint and trains on."""

import asyncio
import signal

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import aiohttp  # noqa: E402
from tidal.engine.reference.launch import ReferenceServer  # noqa: E402
from tidal.protocol.channels import StatusSubscriber, TrajectorySender  # noqa: E402

from tests.trainer.engine_side import EngineSide  # noqa: E402
from tests.trainer.proc import records, served, trainer_toml  # noqa: E402
from tests.trainer.producer import Producer  # noqa: E402


async def feed(trainer, server_url: str, groups: dict[int, list], until: int) -> None:
    """Start `trainer`, send each version's groups once it trains that version, wait for `until` to be
    served (an engine side on the server receives each announced version), then SIGTERM it (it
    checkpoints and exits 0)."""
    ready = await asyncio.to_thread(trainer.start)
    assert ready["device"] == "cuda:0"
    async with (StatusSubscriber(ready["status_endpoint"]) as sub,
                StatusSubscriber(ready["status_endpoint"]) as engine_sub,
                EngineSide([server_url]) as engine,
                TrajectorySender(ready["endpoint"], "engine-test") as tx):
        engine.follow(engine_sub)
        for k, batch in groups.items():
            async with asyncio.timeout(120):
                while (s := sub.latest_status) is None or s.version < k:
                    await sub.recv()
            for t in batch:
                await tx.send(Producer.retag(t, k))
        await engine.reached(until)
    trainer.signal(signal.SIGTERM)
    assert await asyncio.to_thread(trainer.wait) == 0, trainer.log()


async def test_bf16_daemon_trains_on_cuda_publishes_to_a_cuda_server_and_resumes(
        tmp_path, tiny_model_dir, trainer_process):
    producer = Producer(tiny_model_dir, seed=4)
    groups = {k: [t for g in range(2) for t in producer.group(f"s{k}g{g}", version=0, size=2)] for k in range(3)}
    async with (ReferenceServer(tiny_model_dir, args=["--set", "model.device=cuda"]) as srv,
                aiohttp.ClientSession() as http):
        before, _ = await served(http, srv.url)
        cfg = trainer_toml(tmp_path, tiny_model_dir, learner={"model": {"path": str(tiny_model_dir),
                                                                         "dtype": "bfloat16"},
                                                              "optim": {"lr": 1e-2}},
                           checkpoint={"every_steps": 1}, distributed={"device": "cuda"},
                           publish={"type": "distributed", "server_ranks": 1, "timeout_s": 30})
        await feed(trainer_process(cfg), srv.url, {0: groups[0], 1: groups[1]}, until=2)
        logprobs, version = await served(http, srv.url)
        assert version == "2" and logprobs != before
        await feed(trainer_process(cfg), srv.url, {2: groups[2]}, until=3)   # resumes at v2, publishes it again, then v3
        resumed, version = await served(http, srv.url)
        assert version == "3" and resumed != logprobs
    recs = records(tmp_path / "metrics.jsonl")
    steps = [r for r in recs if r["event"] == "step"]
    assert [r["step"] for r in steps] == [0, 1, 2]                  # a step record carries the version it trained
    assert [r["step"] for r in recs if r["event"] == "resume"] == [2]
    assert [r["step"] for r in recs if r["event"] == "publish"] == [1, 2, 2, 3]
    for r in steps:
        assert None not in r.values() and r["trainer/grad_norm"] > 0
    assert (tmp_path / "ckpt" / "step-00000003").exists()
