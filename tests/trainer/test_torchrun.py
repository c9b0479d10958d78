"""`torchrun --nproc-per-node 2 -m trainer` on gloo takes the same step as one process on the same batch."""

import asyncio

import pytest
import torch
from safetensors.torch import load_file

from protocol.channels import TrajectorySender
from protocol.config import load_config
from tests.trainer.proc import records, trainer_toml
from tests.trainer.producer import Producer
from trainer.config import TrainerConfig
from trainer.learner import Learner

pytestmark = pytest.mark.slow


async def test_two_ranks_match_one_process(tmp_path, tiny_model_dir, trainer_process):
    cfg = trainer_toml(tmp_path, tiny_model_dir, max_steps=1, publish={"type": "none"},
                       intake={"batch_size": 6, "group_size": 2})
    trainer = trainer_process(
        cfg, argv=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "trainer"),
    )
    ready = trainer.start()
    producer = Producer(tiny_model_dir, seed=3, gen_tokens=3)
    batch = [t for g in range(3) for t in producer.group(f"g{g}", version=0, size=2)]
    async with TrajectorySender(ready["endpoint"], "engine-test") as tx:
        for t in batch:
            await tx.send(t)
        assert await asyncio.to_thread(trainer.wait, 180) == 0, trainer.log()

    step = next(r for r in records(trainer.jsonl) if r["event"] == "step")
    assert step["ids"].split(",") == [t.id for t in batch]

    single = Learner(load_config(TrainerConfig, trainer.config).learner)
    metrics = single.train_step(batch)
    assert step["trainer/loss"] == pytest.approx(metrics["trainer/loss"], rel=1e-4, abs=1e-6)
    assert step["trainer/trained_tokens"] == metrics["trainer/trained_tokens"]
    ranked = load_file(tmp_path / "ckpt" / "step-00000001" / "model.safetensors")
    base = load_file(f"{tiny_model_dir}/model.safetensors")
    lr = single.cfg.optim.lr
    for name, want in single.base_model.state_dict().items():
        # Adam moves each weight by about lr; 1% of that allows float reduction order, not a wrong step
        torch.testing.assert_close(ranked[name] - base[name], want - base[name], rtol=1e-3, atol=lr * 1e-2)
    assert any(not torch.equal(ranked[n], base[n]) for n in base)
