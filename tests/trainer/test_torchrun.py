"""`torchrun --nproc-per-node 2 -m tidal.trainer` on gloo (DDP, and FSDP2) takes the same steps as one process
on the same batches, including across a restart from its own checkpoint."""

import asyncio

import pytest
import torch
from safetensors.torch import load_file
from tidal.protocol.channels import TrajectorySender
from tidal.protocol.config import load_config
from tidal.trainer.config import TrainerConfig
from tidal.trainer.learner import Learner

from tests.trainer.proc import records, trainer_toml
from tests.trainer.producer import Producer

pytestmark = pytest.mark.slow

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tidal.trainer")


async def run_until_exit(trainer, batch) -> None:
    """Start the ranks, send `batch`, wait for them to stop by themselves (max_steps)."""
    ready = await asyncio.to_thread(trainer.start)
    async with TrajectorySender(ready["endpoint"], "engine-test") as tx:
        for t in batch:
            await tx.send(t)
        assert await asyncio.to_thread(trainer.wait, 180) == 0, trainer.log()


def assert_same_update(path, base: dict, single: Learner) -> None:
    ranked = load_file(path / "model.safetensors")
    for name, want in single.base_model.state_dict().items():
        # Adam moves each weight by about lr; 1% of that allows float reduction order, not a wrong step
        torch.testing.assert_close(ranked[name] - base[name], want - base[name], rtol=1e-3,
                                   atol=single.cfg.optim.lr * 1e-2, msg=f"{path.name}: {name}")


@pytest.mark.parametrize(("strategy", "restarts"), [("ddp", 0), ("fsdp", 1)])
async def test_two_ranks_match_one_process(tmp_path, tiny_model_dir, trainer_process, strategy, restarts):
    """Two steps, in one run (DDP) or with a restart between them (FSDP: sharded state saved and loaded)."""
    producer = Producer(tiny_model_dir, seed=3, gen_tokens=3)
    batches = [[t for g in range(3) for t in producer.group(f"b{i}g{g}", version=i, size=2)] for i in range(2)]
    cfg = trainer_toml(tmp_path, tiny_model_dir, max_steps=2 - restarts, distributed={"strategy": strategy},
                       intake={"batch_size": 6, "group_size": 2}, checkpoint={"every_steps": 1})
    trainer = trainer_process(cfg, argv=TORCHRUN)
    if restarts:
        await run_until_exit(trainer, batches[0])
        trainer = trainer_process({**cfg, "max_steps": 2}, argv=TORCHRUN)  # resumes from step-00000001
        await run_until_exit(trainer, batches[1])
    else:
        await run_until_exit(trainer, batches[0] + batches[1])

    recs = records(trainer.jsonl)
    steps = [r for r in recs if r["event"] == "step"]
    assert [r["step"] for r in recs if r["event"] == "resume"] == [1] * restarts
    assert [r["ids"].split(",") for r in steps] == [[t.id for t in b] for b in batches]

    single = Learner(load_config(TrainerConfig, trainer.config).learner)
    base = {n: t.clone() for n, t in single.base_model.state_dict().items()}
    for i, batch in enumerate(batches):
        metrics = single.train_step(batch)
        assert steps[i]["trainer/loss"] == pytest.approx(metrics["trainer/loss"], rel=1e-4, abs=1e-6)
        assert steps[i]["trainer/trained_tokens"] == metrics["trainer/trained_tokens"]
        # rank 0 gathered (FSDP) the weights it published and the state it checkpointed
        for path in (tmp_path / "weights" / f"v{i + 1:08d}", tmp_path / "ckpt" / f"step-{i + 1:08d}"):
            assert_same_update(path, base, single)
    assert any(not torch.equal(t, base[n]) for n, t in single.base_model.state_dict().items())
