"""Scale-out across torchrun ranks: rank 0 owns intake and publishing, every rank trains.

`torchrun --nproc-per-node N -m tidal.trainer CONFIG` (or `tidal trainer` under torchrun) starts N copies.
Rank 0 forms each step's batch and broadcasts it to the others as the msgpack bytes of its
trajectories in a uint8 tensor (no pickle on any wire, docs/architecture.md invariant 6), preceded by a small
header tensor saying what comes (a step, a gather for publishing or checkpointing under FSDP, stop,
or idle). Every rank holds the whole batch and `Learner.train_step` takes its token-balanced share,
with loss normalisers computed from the whole batch (global token count) and DDP or FSDP2 averaging
gradients: N ranks take the same optimizer step as one process would on the whole batch.

A step ends alike on every rank or the job ends: after each step every rank joins one all-reduce
of its failure flag (with SUMMED_METRICS), so a non-finite step, which every rank sees (the gradient
norm is global), is skipped by all of them together. Any other failure may be this rank's alone (an
out-of-memory on one GPU) while the others wait in a collective it will never join; the rank that
sees it `abort`s: it says which rank failed and why, and exits at once, so torchrun's agent tears
the group down (and with `--max-restarts` starts it again from the last checkpoint, the engines
resending every batch rank 0 has not acknowledged) instead of every rank hanging until the timeout.

Ranks > 0 wait for rank 0's next command in a broadcast, which fails after `distributed.timeout_s`
like any collective. So a rank 0 that waits for a batch tells them to keep waiting: IDLE every
`distributed.idle_every_s` since its last command (`World.keep_alive`). It sends IDLE from the one
coroutine that sends every command, between commands, so every rank sees the same commands in the
same order, one collective at a time; a rank 0 whose loop no longer runs sends nothing, and the
others still time out.

With one process (no torchrun environment) `World` is a no-op and nothing here imports
torch.distributed state.
"""

import asyncio
import json
import logging
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NoReturn

import msgspec
from tidal.protocol.errors import ConfigError, TidalError
from tidal.protocol.messages import Trajectory

__all__ = ["World", "RanksDisagree", "abort", "ABORT_EXIT", "STEP", "STOP", "GATHER_WEIGHTS", "GATHER_STATE",
           "IDLE", "SUMMED_METRICS"]

STEP = 1
"""Header command: a batch follows."""
STOP = 2
"""Header command: leave the loop (rank 0 is shutting down)."""
GATHER_WEIGHTS = 3
"""Header command (FSDP): every rank joins gathering the full weights, rank 0 publishes them."""
GATHER_STATE = 4
"""Header command (FSDP): every rank joins gathering model and optimiser state, rank 0 checkpoints it."""
IDLE = 5
"""Header command: nothing yet, wait for the next command (the wait's timeout starts again)."""

SUMMED_METRICS = ("trainer/loss", "trainer/tokens", "trainer/trained_tokens")
"""Learner metrics that are each rank's share of the step's total (summed across ranks for reports)."""

ABORT_EXIT = 3
"""Exit status of a rank that `abort`s (2 is a configuration or start-up error): torchrun's agent
sees a worker fail, stops the others and restarts the group or exits non-zero itself."""

_batch_decoder = msgspec.msgpack.Decoder(list[Trajectory])
_batch_encoder = msgspec.msgpack.Encoder()


class RanksDisagree(TidalError, RuntimeError):
    """A step failed on some ranks and not on others, though each reached the agreement: the ranks'
    weights may now differ, so no rank can go on."""


def _restarts_share_the_store() -> bool:
    """Whether torchrun may restart this group (`--max-restarts`) over the agent's shared TCPStore, whose
    keys outlive an attempt (torch's process-group keys carry no attempt in their names)."""
    return (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def abort(rank: int, what: str, exc: BaseException) -> NoReturn:
    """End this rank's process now: the error and its traceback to stderr (and to torchrun's error
    file, so its summary shows them), logs flushed, then `os._exit(ABORT_EXIT)`.

    Not `sys.exit`: that would wait for threads stuck in collectives and run `destroy_process_group`,
    which can hang on a group that a failed rank left mid-collective.
    """
    tb = "".join(traceback.format_exception(exc))
    message = f"rank {rank}: {what}: {type(exc).__name__}: {exc}"
    print(f"tidal trainer: {message}; ending the job (torchrun restarts it from the last checkpoint "
          f"with --max-restarts; unacknowledged batches are resent)\n{tb}", file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:  # the format of torch.distributed.elastic's ErrorHandler.record_exception
        try:
            with open(error_file, "w") as f:
                json.dump({"message": {"message": message, "extraInfo": {
                    "py_callstack": tb, "timestamp": str(int(time.time()))}}}, f)
        except OSError as err:
            print(f"tidal trainer: rank {rank}: cannot write {error_file}: {err}", file=sys.stderr, flush=True)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(ABORT_EXIT)


@dataclass
class World:
    """This process's place among the trainer ranks (from torchrun's environment variables)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    """Where this rank trains and where its collectives' tensors live (NCCL needs them on the GPU)."""
    strategy: str = "ddp"
    """"ddp" (every rank holds the weights) or "fsdp" (FSDP2 fully_shard: weights and optimiser state
    sharded, so publishing and checkpointing are collectives every rank joins)."""
    sent_at: float = field(default=-math.inf, repr=False)
    """Rank 0: `time.monotonic()` when its last command went out (-inf: none yet)."""

    @classmethod
    def from_env(cls) -> "World":
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def choose_device(self, device: str = "auto") -> str:
        """This rank's device for distributed.device: "auto" is each rank's own GPU when this node has
        one per local rank, else the CPU for every rank (never a mix, never two ranks on one GPU,
        which NCCL refuses). Returns "cpu" or "cuda:<local rank>"; changes nothing."""
        import torch

        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device == "auto":
            device = "cuda" if gpus >= local_ranks else "cpu"
        if device == "cuda" and gpus <= self.local_rank:
            raise ConfigError(
                f"distributed.device = 'cuda' but local rank {self.local_rank} of {local_ranks} has no GPU "
                f"({gpus} visible); start at most {gpus} ranks per node, or set distributed.device = 'cpu'"
            )
        return f"cuda:{self.local_rank}" if device == "cuda" else device

    def init(self, backend: str, device: str = "auto", timeout_s: float | None = None) -> None:
        """Take this rank's device (`choose_device`) and join torchrun's group. `timeout_s` bounds each
        collective (None: torch's default)."""
        import torch

        device = self.choose_device(device)
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        self.device = device
        if self.distributed:
            import torch.distributed as dist

            if self.rank == 0 and _restarts_share_the_store():
                print("tidal trainer: torchrun --max-restarts with the TCPStore its agent shares: a restarted group "
                      "can read the previous attempt's addresses and fail or hang while it forms (seen with torch "
                      "2.13; pytorch/pytorch#135712, #167288); start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
                      file=sys.stderr, flush=True)
            if not dist.is_initialized():
                timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
                dist.init_process_group(backend=backend, timeout=timeout)

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    @property
    def sharded(self) -> bool:
        return self.distributed and self.strategy == "fsdp"

    def parallelize(self, learner) -> None:
        """Train `learner` across ranks: DDP (replicated weights, averaged gradients) or FSDP2 (each
        decoder layer, then the rest, sharded with fully_shard; gradients reduce-scattered).

        fully_shard replaces the module's parameters with sharded ones, so the (still empty) optimiser's
        parameter groups are pointed at the new ones, in the same order.
        """
        if not self.distributed:
            return
        model = learner.base_model
        if not self.sharded:
            from torch.nn.parallel import DistributedDataParallel

            on_gpu = self.device.startswith("cuda")
            learner.model = DistributedDataParallel(model, device_ids=[self.local_rank] if on_gpu else None)
            return
        from torch.distributed.fsdp import fully_shard

        before = list(model.parameters())
        for layer in getattr(getattr(model, "model", None), "layers", ()):
            fully_shard(layer)
        learner.model = fully_shard(model)
        sharded = dict(zip(map(id, before), model.parameters(), strict=True))
        for group in learner.optimizer.param_groups:
            group["params"] = [sharded[id(p)] for p in group["params"]]

    # --- whole state of a sharded learner (FSDP); every rank calls these together ---

    def full_weights(self, learner) -> dict:
        """The policy's full tensors (FSDP: gathered, a collective); what rank 0 publishes."""
        return {name: t.detach().to("cpu") if self.sharded else t for name, t in learner.named_weights()}

    def full_state(self, learner) -> dict:
        """`Learner.state_dict()` with model and optimiser state in full, keyed by parameter name
        (torch.distributed.checkpoint's full state dict: gathered under FSDP, a collective then).
        One format for every strategy, so a checkpoint resumes on any number of ranks."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        state = learner.state_dict()
        state["model"], state["optimizer"] = get_state_dict(
            learner.base_model, learner.optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=self.sharded),
        )
        return state

    def load_state(self, learner, state: dict) -> None:
        """Inverse of `full_state`: every rank passes the whole saved state and keeps what it holds."""
        import torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            learner.base_model, learner.optimizer, model_state_dict=state["model"],
            optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True),
        )
        learner.scheduler.load_state_dict(state["scheduler"])
        learner.version = int(state["version"])
        torch.set_rng_state(state["rng"]["torch"])

    def all_reduce(self, values):
        """Sum a numpy array across ranks (the learner whitens advantages with it)."""
        import numpy as np
        import torch
        import torch.distributed as dist

        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(self.device)
        dist.all_reduce(t)
        return t.cpu().numpy()

    # --- the batch, rank 0 -> all ---

    def send(self, command: int, batch: list[Trajectory] = ()) -> None:
        """Rank 0: broadcast a command and, for STEP, the batch's bytes."""
        import torch
        import torch.distributed as dist

        payload = _batch_encoder.encode(list(batch)) if command == STEP else b""
        dist.broadcast(torch.tensor([command, len(payload)], dtype=torch.int64, device=self.device), src=0)
        if payload:
            dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device), src=0)
        self.sent_at = time.monotonic()

    async def keep_alive(self, waits: set[asyncio.Future], every_s: float) -> None:
        """Rank 0: wait until one of `waits` is done, sending IDLE whenever `every_s` have passed since
        the last command, so that the other ranks' `receive` does not time out while there is nothing
        to send. One process: a plain wait.

        Call it only between commands, from the code that sends them (never while a command's
        collectives run in a thread). An IDLE cancelled while it is being sent is waited for (its
        thread cannot be stopped), so that the next command never overtakes it.
        """
        while True:
            due = self.sent_at + every_s - time.monotonic() if self.distributed else None
            done, _ = await asyncio.wait(waits, timeout=None if due is None else max(due, 0.0),
                                         return_when=asyncio.FIRST_COMPLETED)
            if done:
                return
            beat = asyncio.ensure_future(asyncio.to_thread(self.send, IDLE))
            try:
                await asyncio.shield(beat)
            except asyncio.CancelledError:
                await asyncio.gather(beat, return_exceptions=True)
                raise

    def receive(self) -> tuple[int, list[Trajectory]]:
        """Ranks > 0: wait for rank 0's next command and batch."""
        import torch
        import torch.distributed as dist

        header = torch.zeros(2, dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        command, nbytes = (int(x) for x in header)
        if command != STEP:
            return command, []
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, src=0)
        return command, _batch_decoder.decode(buf.cpu().numpy().tobytes())

    def reduce_step(self, metrics: dict[str, float], *, failed: bool) -> tuple[int, dict[str, float]]:
        """Every rank calls this after each step, failed or not: one all-reduce sums the ranks' failure
        flags and their SUMMED_METRICS. Returns how many ranks failed (the same on every rank) and
        `metrics` with SUMMED_METRICS made the whole step's values."""
        if not self.distributed:
            return int(failed), metrics
        shares = [metrics.get(name, 0.0) for name in SUMMED_METRICS]  # same length on every rank
        failures, *totals = self.all_reduce([float(failed), *shares])
        for name, total in zip(SUMMED_METRICS, totals, strict=True):
            if name in metrics:
                metrics[name] = float(total)
        return round(failures), metrics
