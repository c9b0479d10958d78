"""`tidal serve` with model.device = cuda: concurrent greedy and seeded sampled requests decode on the
GPU (batched prefill, per-sequence prefill with prompt logprobs, the kept decode batch), and every
logprob is the one the same checkpoint gives on the CPU, teacher-forced (docs/sglang.md §1.4)."""

import asyncio

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import aiohttp  # noqa: E402
from tidal.engine.reference.launch import ReferenceServer  # noqa: E402

PROMPTS = [[11, 42, 99, 7], [40, 41, 42, 43, 44, 45, 46], [200, 3, 17]]
NEW = 12


@pytest.fixture(scope="module")
def cpu_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def teacher_forced(model, prompt: list[int], output: list[int], temperature: float = 1.0) -> torch.Tensor:
    """(len(prompt) + len(output) - 1, V) log-softmax of the tempered CPU logits predicting tokens 1.."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0, :-1].float()
    return torch.log_softmax(logits / temperature, dim=-1)


async def generate(http: aiohttp.ClientSession, url: str, body: dict) -> dict:
    async with http.post(f"{url}/generate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 2e-4), ("bfloat16", 0.15)])
async def test_cuda_server_returns_the_logprobs_of_the_served_model(tiny_model_dir, cpu_model, cuda_free_mib,
                                                                    dtype, tol):
    free = cuda_free_mib()
    args = ["--set", "model.device=cuda", "--set", f"model.dtype={dtype}"]
    async with ReferenceServer(tiny_model_dir, args=args) as srv, aiohttp.ClientSession() as http:
        async with http.get(f"{srv.url}/server_info") as resp:
            info = await resp.json()
        assert (info["device"], info["dtype"]) == ("cuda", dtype)
        assert cuda_free_mib() < free - 100, "the server holds no GPU memory"
        greedy = {"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True}
        bodies = [{"input_ids": p, "return_logprob": True, "sampling_params": greedy} for p in PROMPTS]
        bodies[0]["logprob_start_len"] = 0                # its own prefill, with prompt logprobs
        outs = await asyncio.gather(*(generate(http, srv.url, b) for b in bodies))
        for prompt, out in zip(PROMPTS, outs, strict=True):
            ids, meta = out["output_ids"], out["meta_info"]
            assert len(ids) == NEW
            want = teacher_forced(cpu_model, prompt, ids)[len(prompt) - 1:]
            got = torch.tensor([lp for lp, _, _ in meta["output_token_logprobs"]])
            chosen = want.gather(1, torch.tensor(ids)[:, None])[:, 0]
            torch.testing.assert_close(got, chosen, rtol=0, atol=tol)
            assert (chosen >= want.max(-1).values - tol).all(), "a greedy token is not the argmax"
        inputs = outs[0]["meta_info"]["input_token_logprobs"]
        assert inputs[0][0] is None and len(inputs) == len(PROMPTS[0])
        prompt_want = teacher_forced(cpu_model, PROMPTS[0], [])
        prompt_want = prompt_want.gather(1, torch.tensor(PROMPTS[0][1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor([lp for lp, _, _ in inputs[1:]]), prompt_want, rtol=0, atol=tol)

        sampled = {"temperature": 0.7, "max_new_tokens": NEW, "ignore_eos": True, "sampling_seed": 5}
        body = {"input_ids": PROMPTS[1], "return_logprob": True, "sampling_params": sampled}
        first, again, other = await asyncio.gather(
            generate(http, srv.url, body), generate(http, srv.url, body),
            generate(http, srv.url, {**body, "sampling_params": {**sampled, "sampling_seed": 6}}))
        assert first["output_ids"] == again["output_ids"] != other["output_ids"]
        ids = first["output_ids"]
        want = teacher_forced(cpu_model, PROMPTS[1], ids, 0.7)[len(PROMPTS[1]) - 1:]
        got = torch.tensor([lp for lp, _, _ in first["meta_info"]["output_token_logprobs"]])
        torch.testing.assert_close(got, want.gather(1, torch.tensor(ids)[:, None])[:, 0], rtol=0, atol=tol)
