"""`tidal bench trainer`: training throughput with packing vs naive padding, and weight-publish cost.

Training: one tiny random Llama on CPU trains on a long-tailed (lognormal) mix of multi-turn-shaped
sequence lengths, as agent rollouts have, with the same token budget per micro-batch under both
layouts (trainer/packing.py, see CASES), stepping on the same batches in turn; figures are tokens/s
over real (non-padding) tokens after a warm-up step, and `packing_speedup` is the median per-step
time ratio (padding / packing), robust to a shared machine's load.

Publishing: trainer/publish.py's two publishers, each timed end to end for a larger random Llama:
disk (safetensors + config into a temporary directory, then rename) and distributed (the trainer
announces and gloo-broadcasts; an engine-side WeightSync has a CPU reference server, `tidal serve`,
join the group over its SGLang-style HTTP API and load the tensors, timed until it serves the version).
Reported as ms per MB of weights, next to the time that memcpy-speed bandwidth alone would take.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
from tidal.bench.report import bench_parser, emit

__all__ = ["main"]

QUICK = {"seqs": 16, "steps": 2, "max_len": 256, "train_hidden": 64, "publish_hidden": 256,
         "publish_layers": 2, "publish_repeats": 2}
FULL = {"seqs": 96, "steps": 8, "max_len": 1024, "train_hidden": 128, "publish_hidden": 512,
        "publish_layers": 4, "publish_repeats": 5}
TOKEN_BUDGET = 2048


def _batch(n: int, max_len: int, seed: int):
    """Long-tailed multi-turn-shaped trajectories: prompt | turn | observation | turn, GRPO groups of 4."""
    from tidal.protocol.messages import Trajectory, Turn

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(4.5, 0.9, n), 16, max_len).astype(int)
    out = []
    for i, length in enumerate(lengths):
        a, b, c = length // 4, length // 2, 3 * length // 4
        mask = np.zeros(length, dtype=np.uint8)
        mask[a:b] = mask[c:] = 1
        out.append(Trajectory.build(
            id=f"b{i}", group_id=f"g{i // 4}", env_id="bench", task_seed=i,
            tokens=rng.integers(7, 250, length), loss_mask=mask,
            behav_logp=np.where(mask == 1, -rng.uniform(1, 6, length), 0.0),
            versions=np.where(mask == 1, 0, -1), turns=[Turn(a, b, 0.0), Turn(c, length, float(i % 2))],
            reward=float(i % 2), terminated=True,
        ))
    return out


CASES = {
    "pack": ["packing.strategy=pack"],                                       # rows as wide as the longest
    "pack_one_row": ["packing.strategy=pack", f"packing.row_tokens={TOKEN_BUDGET}"],   # the varlen layout
    "pad": ["packing.strategy=pad"],
}
"""Micro-batch layouts compared; `pack_one_row` is what flash-attention varlen wants, measured here
to show what a dense-mask kernel (sdpa on CPU) pays for it."""


def _learner(model_dir: Path, overrides: list[str]):
    from tidal.protocol.config import load_config
    from tidal.trainer.learner import Learner, LearnerConfig

    return Learner(load_config(LearnerConfig, overrides=[
        f"model.path={model_dir}", "model.dtype=float32", "advantage.type=grpo", "loss.type=ppo",
        f"packing.token_budget={TOKEN_BUDGET}", *overrides,
    ]))


def _train(model_dir: Path, size: dict) -> tuple[list[dict], dict[str, float]]:
    """Every layout steps on the same batches, interleaved so machine load hits all alike; returns
    their rows and, per layout, the median over steps of the per-step time ratio pad / layout."""
    learners = {name: _learner(model_dir, overrides) for name, overrides in CASES.items()}
    for learner in learners.values():
        learner.train_step(_batch(4, size["max_len"], seed=100))                   # warm-up
    steps: dict[str, list[dict]] = {name: [] for name in learners}
    for step in range(size["steps"]):
        batch = _batch(size["seqs"], size["max_len"], seed=step)
        for name, learner in learners.items():
            steps[name].append(learner.train_step(batch))
    rows, speedups = [], {}
    for name, ms in steps.items():
        seconds = sum(m["trainer/step_s"] for m in ms)
        speedups[name] = float(np.median([p["trainer/step_s"] / m["trainer/step_s"]
                                          for m, p in zip(ms, steps["pad"], strict=True)]))
        rows.append({
            "case": f"train/{name}", "tokens_per_s": sum(m["trainer/tokens"] for m in ms) / seconds,
            "speedup_vs_pad": speedups[name],
            "padding_fraction": float(np.mean([m["trainer/padding_frac"] for m in ms])),
            "micro_batches": float(np.mean([m["trainer/micro_batches"] for m in ms])),
            "step_s": float(np.median([m["trainer/step_s"] for m in ms])),
        })
    return rows, speedups


def _memcpy_ms_per_mb() -> float:
    buf = np.ones(64 * 2**20, dtype=np.uint8)
    dst = np.empty_like(buf)
    t0 = time.perf_counter()
    for _ in range(5):
        np.copyto(dst, buf)
    return (time.perf_counter() - t0) / 5 / 64 * 1e3


async def _publish(model_dir: Path, out_dir: Path, repeats: int) -> list[dict]:
    import torch
    from tidal.engine.backends import SGLangBackend, SGLangConfig
    from tidal.engine.reference.launch import ReferenceServer
    from tidal.engine.weights import WeightSync
    from tidal.trainer.config import DiskPublish, DistributedPublish
    from tidal.trainer.publish import DiskPublisher, DistributedPublisher
    from transformers import AutoModelForCausalLM

    tensors = dict(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict())
    mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    rows = []
    disk = DiskPublisher(DiskPublish(dir=str(out_dir / "weights"), keep_last=1), str(model_dir))
    times = []
    for version in range(1, repeats + 1):
        await disk.publish(version, tensors)
        times.append(disk.last_seconds)
    rows.append({"case": "publish/disk", "mb": mb, "seconds": float(np.median(times)),
                 "ms_per_mb": float(np.median(times)) * 1e3 / mb})
    # distributed: the trainer announces and broadcasts, an engine-side WeightSync has the server receive;
    # the time is the publish's until the server serves the version
    async with ReferenceServer(model_dir) as srv, SGLangBackend(SGLangConfig(urls=[srv.url])) as backend:
        sync = WeightSync(backend, lambda version: None)
        syncing = asyncio.create_task(sync.run())

        async def announce(notice) -> None:
            sync.offer(notice)

        pub = DistributedPublisher(DistributedPublish(server_ranks=1, backend="gloo", bucket_mb=64.0, timeout_s=30.0),
                                   announce)
        times = []
        try:
            await pub.start()
            for version in range(1, repeats + 1):
                t0 = time.perf_counter()
                await pub.publish(version, tensors)
                while sync.updates + sync.failures < version:
                    await asyncio.sleep(0.001)
                if sync.failures:
                    raise RuntimeError(f"the engine side failed: {sync.last_error}")
                times.append(time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - a failing publisher is this case's result: its row
            # names the error and its summary figure is null, the other cases still report
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
        else:
            error = ""
        finally:
            await pub.close()
            syncing.cancel()
            await asyncio.gather(syncing, return_exceptions=True)
    if error:
        rows.append({"case": "publish/gloo", "mb": mb, "error": error})
    else:
        rows.append({"case": "publish/gloo", "mb": mb, "seconds": float(np.median(times)),
                     "ms_per_mb": float(np.median(times)) * 1e3 / mb})
    return rows


def main(argv: list[str]) -> int:
    parser = bench_parser("trainer", __doc__.splitlines()[0])
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    from tidal.engine.reference.tiny import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="tidal-bench-trainer-") as tmp:
        tmp = Path(tmp)
        train_dir = build_tiny_model(tmp / "train", hidden=size["train_hidden"])
        rows, speedups = _train(train_dir, size)
        pub_dir = build_tiny_model(tmp / "publish", layers=size["publish_layers"], hidden=size["publish_hidden"])
        rows += asyncio.run(_publish(pub_dir, tmp, size["publish_repeats"]))
    by_case = {r["case"]: r for r in rows}
    summary = {
        "packing_speedup": speedups["pack"],
        "one_row_packing_speedup": speedups["pack_one_row"],
        "padding_fraction": by_case["train/pack"]["padding_fraction"],
        "naive_padding_fraction": by_case["train/pad"]["padding_fraction"],
        "train_tokens_per_s": by_case["train/pack"]["tokens_per_s"],
        "publish_ms_per_mb_disk": by_case["publish/disk"]["ms_per_mb"],
        "publish_ms_per_mb_gloo": by_case["publish/gloo"].get("ms_per_mb"),
        "memcpy_ms_per_mb": _memcpy_ms_per_mb(),
    }
    config = {**size, "token_budget": TOKEN_BUDGET, "quick": args.quick}
    emit("trainer", config, rows, summary, args.json_out)
    return 0
