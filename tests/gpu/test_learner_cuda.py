"""The learner on CUDA: an fp32 step matches the same step on the CPU (loss, gradients, metrics) for
each estimator and loss path, and a pure-bf16 step trains (finite, weights move, same entropy)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from tidal.trainer.learner import Learner  # noqa: E402

from tests.trainer.test_learner import batch_of, config  # noqa: E402

PATHS = {
    "grpo-ppo-packed": ("advantage.type=grpo", "loss.type=ppo", "packing.token_budget=64"),
    "gae-value-head": ("advantage.type=gae", "loss.type=ppo"),
    "reinforce_pp-kl-reference": ("advantage.type=reinforce_pp", "loss.type=tis", "loss.kl_coef=0.1"),
    "two-minibatches-padded": ("advantage.type=grpo", "optim.minibatches=2", "packing.strategy=pad",
                               "packing.token_budget=80", "model.gradient_checkpointing=true"),
}


def step(learner: Learner, batch) -> tuple[dict, dict, dict]:
    """Train one step; return (metrics, float32 CPU gradients, float32 CPU weight deltas)."""
    before = {n: p.detach().float().cpu().clone() for n, p in learner.base_model.named_parameters()}
    metrics = learner.train_step(batch)
    grads = {n: p.grad.float().cpu() for n, p in learner.base_model.named_parameters() if p.grad is not None}
    deltas = {n: p.detach().float().cpu() - before[n] for n, p in learner.base_model.named_parameters()}
    return metrics, grads, deltas


@pytest.mark.parametrize("path", PATHS)
def test_fp32_step_on_cuda_matches_the_cpu_step(tiny_model_dir, path):
    batch = batch_of(8, seed=1)
    cfg = config(tiny_model_dir, "optim.max_grad_norm=0", *PATHS[path])
    cpu = step(Learner(cfg, device="cpu"), batch)
    gpu_learner = Learner(cfg, device="cuda")
    assert next(gpu_learner.base_model.parameters()).is_cuda
    gpu = step(gpu_learner, batch)
    assert cpu[0]["trainer/adv_zero_frac"] < 0.5               # the batch carries signal: gradients are not 0
    for name in ("trainer/loss", "trainer/grad_norm", "trainer/entropy", "trainer/kl_behav", "trainer/adv_std"):
        assert np.isfinite(gpu[0][name]), name
        assert gpu[0][name] == pytest.approx(cpu[0][name], rel=1e-3, abs=1e-5), name
    assert gpu[1].keys() == cpu[1].keys() and gpu[1]
    for name, want in cpu[1].items():
        torch.testing.assert_close(gpu[1][name], want, rtol=1e-3, atol=1e-6, msg=name)
    moved = [n for n, d in gpu[2].items() if d.abs().max() > 0]
    assert moved and set(moved) == {n for n, d in cpu[2].items() if d.abs().max() > 0}


def test_bf16_step_on_cuda_trains_and_keeps_the_fp32_entropy(tiny_model_dir):
    batch = batch_of(8, seed=1)
    common = ("advantage.type=grpo", "loss.type=ppo", "optim.lr=1e-2")
    ref, _, _ = step(Learner(config(tiny_model_dir, *common), device="cuda"), batch)
    learner = Learner(config(tiny_model_dir, *common, "model.dtype=bfloat16"), device="cuda")
    assert next(learner.base_model.parameters()).dtype == torch.bfloat16
    metrics, grads, deltas = step(learner, batch)
    for name in ("trainer/loss", "trainer/grad_norm", "trainer/entropy", "trainer/is_weight_mean"):
        assert np.isfinite(metrics[name]), name
    assert metrics["trainer/entropy"] == pytest.approx(ref["trainer/entropy"], rel=0.02)
    assert metrics["trainer/grad_norm"] == pytest.approx(ref["trainer/grad_norm"], rel=0.1)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert all(d.abs().max() > 0 for d in deltas.values()), "a parameter did not move in bf16"
    again = learner.train_step(batch)                                # a second step on the moved weights
    assert learner.version == 2 and np.isfinite(again["trainer/loss"])
