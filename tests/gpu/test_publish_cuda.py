"""Weight publishing into `tidal serve` on CUDA, the update_weights_from_distributed flow of
tests/trainer/test_publish.py with the trainer's tensors on the GPU: over gloo (trainer and server may
share a GPU), and over NCCL (GPU to GPU; on one GPU NCCL refuses, and the publish says so). The
trainer's publisher announces and broadcasts; the engine's WeightSync over the sglang backend has the
server join and receive (tests/trainer/engine_side.py). Each publish negates the output head, so the
served greedy tokens change, and the served logprobs must equal the negated checkpoint's on the CPU,
teacher-forced: every tensor arrived whole."""

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import aiohttp  # noqa: E402
import msgspec  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tidal.engine.reference.launch import ReferenceServer  # noqa: E402
from tidal.trainer.config import DistributedPublish  # noqa: E402
from tidal.trainer.publish import DistributedPublisher, PublishError  # noqa: E402

from tests.trainer.engine_side import EngineSide  # noqa: E402

PROMPT = [40, 41, 42, 43, 44]


def weights(model_dir, device: str, *, flip: bool) -> dict:
    tensors = {name: t.to(device) for name, t in load_file(f"{model_dir}/model.safetensors").items()}
    if flip:
        tensors["lm_head.weight"] = -tensors["lm_head.weight"]
    return tensors


def cpu_logprobs(model_dir, tensors: dict, output: list[int]) -> torch.Tensor:
    """Logprobs of `output` after PROMPT under `tensors`, on the CPU in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.load_state_dict({name: t.cpu() for name, t in tensors.items()})
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + output])).logits[0, len(PROMPT) - 1: -1]
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(output)[:, None])[:, 0]


async def served(http: aiohttp.ClientSession, url: str) -> tuple[list[int], torch.Tensor, str]:
    body = {"input_ids": PROMPT, "return_logprob": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}}
    async with http.post(f"{url}/generate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        out = await resp.json()
    async with http.get(f"{url}/model_info") as resp:
        version = (await resp.json())["weight_version"]
    return out["output_ids"], torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]), version


async def publish_twice(model_dir, server_device: str, cfg: DistributedPublish, first_on: str) -> None:
    """Publish the negated head from `first_on` ("cpu": the daemon's overlap copy), then the original
    weights from the GPU as flat buckets; check what the server serves after each."""
    flipped = weights(model_dir, first_on, flip=True)
    async with (ReferenceServer(model_dir, args=["--set", f"model.device={server_device}"]) as srv,
                aiohttp.ClientSession() as http, EngineSide([srv.url]) as engine):
        before, _, _ = await served(http, srv.url)
        publisher = DistributedPublisher(msgspec.structs.replace(cfg, server_ranks=1), engine.announce)
        await publisher.start()
        try:
            notice = await publisher.publish(1, flipped)
            await engine.settled(1)
            after, logprobs, version = await served(http, srv.url)
            assert version == "1" and after != before and notice.source.backend == cfg.backend
            torch.testing.assert_close(logprobs, cpu_logprobs(model_dir, flipped, after), rtol=0, atol=2e-4)
            publisher.cfg = msgspec.structs.replace(publisher.cfg, flatten=True)
            await publisher.publish(2, weights(model_dir, "cuda", flip=False))
            await engine.settled(2)
            again, _, version = await served(http, srv.url)
            assert version == "2" and again == before and engine.sync.failures == 0
        finally:
            await publisher.close()


@pytest.mark.parametrize("first_on", ["cuda", "cpu"])
async def test_gloo_publish_from_the_gpu_into_a_server_on_the_same_gpu(tiny_model_dir, first_on):
    cfg = DistributedPublish(group_name="gpu_gloo", backend="gloo", bucket_mb=0.1, timeout_s=60)
    await publish_twice(tiny_model_dir, "cuda", cfg, first_on)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per process: two GPUs")
@pytest.mark.parametrize("first_on", ["cuda", "cpu"])
async def test_nccl_publish_into_a_server_on_another_gpu(tiny_model_dir, first_on):
    cfg = DistributedPublish(group_name="gpu_nccl", backend="nccl", bucket_mb=0.1, timeout_s=30)
    await publish_twice(tiny_model_dir, "cuda:1", cfg, first_on)


async def test_nccl_publish_to_a_server_on_the_same_gpu_fails_clearly_and_the_server_serves_on(tiny_model_dir):
    """NCCL joins no two processes on one GPU (a colocated trainer and server): the publish fails fast
    with what to do instead, and the server keeps serving the weights it had."""
    async with (ReferenceServer(tiny_model_dir, args=["--set", "model.device=cuda:0"]) as srv,
                aiohttp.ClientSession() as http, EngineSide([srv.url]) as engine):
        before = await served(http, srv.url)
        cfg = DistributedPublish(server_ranks=1, group_name="gpu_nccl", backend="nccl", timeout_s=30)
        publisher = DistributedPublisher(cfg, engine.announce)
        await publisher.start()
        try:
            with pytest.raises(PublishError, match=r"publishing version 1 over .* two of its processes are on one GPU"
                                                   r".*publish.backend = 'gloo'"):
                await publisher.publish(1, weights(tiny_model_dir, "cuda", flip=True))
            await engine.settled(1)
            assert engine.sync.failures == 1  # the server's receive failed too; the engine left the group
        finally:
            await publisher.close()
        after = await served(http, srv.url)
    assert after[0] == before[0] and after[2] == before[2] == "default"
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)
