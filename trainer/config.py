"""`tidal trainer` configuration: one Strict section per concern, loaded by `tidal.protocol.config.load_config`.

Defaults give a runnable single-process CPU trainer on loopback; cross-field rules run at load and name
both fields (docs/contributing.md, Configuration). Derived values are properties. "auto" fields (the device, the
model's dtype) are resolved by `TrainerConfig.resolved`, which is what `--print-config` prints.

Importing this module imports torch: `LearnerConfig` lives beside the Learner in trainer/learner.py,
so `tidal trainer --print-config` loads torch too (and uses it to resolve "auto").
"""

from typing import Annotated, Literal

import msgspec
from msgspec import Meta
from tidal.protocol.config import Strict
from tidal.trainer.advantages import GRPOConfig, RLOOConfig
from tidal.trainer.learner_config import LearnerConfig, resolve_dtype

__all__ = [
    "IntakeConfig",
    "CheckpointConfig",
    "DiskPublish",
    "DistributedPublish",
    "NoPublish",
    "MetricsConfig",
    "FailuresConfig",
    "DistributedConfig",
    "TrainerConfig",
]

PosInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]


class IntakeConfig(Strict):
    """Where trajectories come from and how a step's batch is formed (docs/architecture.md invariants 3 and 4)."""

    endpoint: str = "tcp://127.0.0.1:5555"
    """ZeroMQ endpoint the trainer binds for trajectories (loopback by default, invariant 7)."""
    status_endpoint: str = "tcp://127.0.0.1:5556"
    """ZeroMQ endpoint the trainer binds to publish TrainerStatus and WeightsPublished."""
    batch_size: PosInt = 16
    """B: trajectories per optimizer step (the engine's admission bound is (k + 1 + max_staleness) * B)."""
    group_size: PosInt = 4
    """Trajectories per group (same prompt, for group-relative advantages); a batch never splits one.
    Must match the engine's group size."""
    max_staleness: NonNegInt = 1
    """Trajectories whose staleness (trained version - min_version) exceeds this are dropped and counted."""
    capacity: PosInt = 256
    """Trajectories buffered at most; when full the trainer stops receiving and the channel pushes back."""
    max_uncommitted: PosInt = 192
    """Deliveries received but not yet acknowledged at most; reaching it forces a checkpoint (mode
    "checkpoint") so the engines' resend windows never fill and stall. Keep it below their window."""
    engine_timeout_s: Annotated[float, Meta(gt=0)] = 30.0
    """An engine not heard from for this long is gone: its unfinished episodes are lost work and its unused
    share of the staleness budget goes to the others (tidal.protocol.grants). Engines stop starting
    episodes sooner (their trainer.status_timeout_s), so a silent engine has stopped before it is written off."""
    commit: Literal["checkpoint", "step"] = "checkpoint"
    """When engines may forget a trajectory: once a durable checkpoint covers it (no loss across a crash),
    or once a step has used it (smaller engine windows; a crash loses the steps since the checkpoint)."""
    curve_secret_key: str = ""
    """CURVE across hosts: the trainer's `trainer.key_secret` file from `tidal keys` ("" with
    curve_allowed_dir "": no encryption or authentication, for loopback). Set both or neither."""
    curve_allowed_dir: str = ""
    """CURVE across hosts: directory of the engines' public `*.key` files (`tidal keys` makes DIR/engines);
    an engine whose key is not there is refused and counted. Keys added or removed apply at the next connection."""

    def __post_init__(self) -> None:
        if self.batch_size % self.group_size:
            raise ValueError(
                f"intake.batch_size ({self.batch_size}) must be a multiple of intake.group_size ({self.group_size})"
            )
        if self.capacity < self.batch_size:
            raise ValueError(
                f"intake.capacity ({self.capacity}) must hold at least one batch (intake.batch_size = {self.batch_size})"
            )


class CheckpointConfig(Strict):
    """Durable training state: written every N steps, on SIGTERM and when intake.max_uncommitted is hit."""

    dir: str = "runs/trainer/checkpoints"
    """Directory of `step-XXXXXXXX/` checkpoints; the daemon resumes from the newest complete one."""
    every_steps: NonNegInt = 10
    """Write a checkpoint after every this many steps (0: only on SIGTERM and intake pressure)."""
    keep_last: PosInt = 2
    """Checkpoints kept; older ones are deleted after a newer one is durable."""
    overlap: bool = True
    """Write while training goes on, from a CPU copy of model and optimiser state (that much memory);
    deliveries are acknowledged only once the write is durable either way."""


class NoPublish(Strict, tag="none", tag_field="type"):
    """Do not publish weights (a trainer that only checkpoints)."""


class DiskPublish(Strict, tag="disk", tag_field="type"):
    """Write safetensors for each version under `dir`, then send WeightsPublished with its checksum."""

    dir: str = "runs/trainer/weights"
    """Shared directory the inference servers read from (`/update_weights_from_disk`)."""
    every_steps: PosInt = 1
    """Publish after every this many steps."""
    keep_last: PosInt = 3
    """Published versions kept on disk."""
    overlap: bool = True
    """Write while the next step trains, from a CPU copy of the weights (one model's worth of memory)."""


class DistributedPublish(Strict, tag="distributed", tag_field="type"):
    """Broadcast weights to inference servers over a torch.distributed group (SGLang's
    update_weights_from_distributed); the trainer is rank 0 and hosts the rendezvous. The trainer
    never calls the servers: it announces each version on the status channel, and the engine has
    its servers join the group and receive under its pause policy."""

    server_ranks: PosInt = 1
    """Ranks the inference servers take in the group: the sum of their tensor-parallel sizes (one
    per server at TP = 1), as many as the engine's backend brings (it checks). The group's world
    size is 1 + this."""
    master_address: str = "127.0.0.1"
    """Address the servers rendezvous at (this trainer host)."""
    master_port: NonNegInt = 0
    """Rendezvous port; 0 picks a free one each time the group is formed."""
    group_name: str = "tidal_weights"
    """Name of the weight-update group on the servers."""
    backend: Literal["gloo", "nccl"] = "gloo"
    """gloo on CPU, nccl between GPUs."""
    bucket_mb: Annotated[float, Meta(gt=0)] = 64.0
    """Parameters are broadcast in buckets of about this many MiB, one server call per bucket."""
    flatten: bool = False
    """Send each bucket as one flat tensor (SGLang's load_format "flattened_bucket"): one collective per
    bucket instead of one per parameter, at the cost of a pack copy here and an unpack on the server."""
    every_steps: PosInt = 1
    """Publish after every this many steps."""
    overlap: bool = True
    """Broadcast while the next step trains, from a CPU copy of the weights (one model's worth of memory)."""
    timeout_s: Annotated[float, Meta(gt=0)] = 120.0
    """Budget for the servers to join the group after the notice, and for each bucket's broadcast."""


class MetricsConfig(Strict):
    """Where per-step metrics go."""

    jsonl: str = "runs/trainer/metrics.jsonl"
    """One JSON object per step (also the ledger of trajectory ids each step used); "" to disable."""
    prometheus_port: int = -1
    """Port of the Prometheus endpoint on 127.0.0.1 (0 picks one, -1 disables)."""
    tensorboard_dir: str = ""
    """TensorBoard log directory, used only when tensorboard is installed; "" to disable."""
    console: bool = True
    """Show a rich live status line."""


class FailuresConfig(Strict):
    """What a failed training step does (an exception, a non-finite loss): it is logged with its
    traceback and counted, its batch goes to the dead letter, and the daemon takes the next batch.
    Under torchrun only a non-finite step, which every rank sees alike, is handled so; an exception on
    any rank ends the job, unacknowledged, for torchrun to restart (trainer/distributed.py)."""

    dead_letter: str = "runs/trainer/dead_letter.jsonl"
    """JSONL file of failed batches: one record per failed step, with the error, the traceback and the
    whole trajectories (trainer/dead_letter.py reads them back). A record is durable before the
    batch's deliveries are acknowledged, so a failed batch is never lost and never blocks the stream."""
    max_consecutive: PosInt = 3
    """Failed steps in a row that stop the daemon with an error (a persistent fault: a broken model,
    a device that keeps failing) instead of dead-lettering every batch that arrives."""


class DistributedConfig(Strict):
    """The training device, and scale-out across torchrun ranks."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """DDP (replicated weights) or FSDP2 fully_shard (weights and optimiser state sharded across ranks)."""
    backend: Literal["gloo", "nccl"] = "gloo"
    """Collective backend between trainer ranks (nccl between GPUs)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: "auto" (each rank's GPU when there is one, else the CPU), "cpu" or "cuda"."""
    threads: NonNegInt = 0
    """torch intra-op CPU threads of each rank (0 = torch's default, one per core). On a machine whose
    cores the trainer shares with a CPU inference server and the engine, 1 keeps it from spinning
    threads that wait for cores others hold (`tidal bench learning` pins it so)."""
    timeout_s: Annotated[float, Meta(gt=0)] = 1800.0
    """Longest a rank waits in one collective before it fails (torch.distributed's timeout; gloo's
    default, NCCL's is 600). Ranks > 0 wait for rank 0's next command in a broadcast; while rank 0
    waits for a batch it tells them to keep waiting every `idle_every_s`, so the trainer may go
    without batches for any time, but a rank 0 silent this long ends the job. A step that raises on
    some ranks does not wait for it: the rank that raised ends the job at once (trainer/distributed.py)."""

    @property
    def idle_every_s(self) -> float:
        """How often rank 0, waiting for a batch, sends the other ranks IDLE (trainer/distributed.py): a
        quarter of `timeout_s`, so that an IDLE may come three quarters of it late (rank 0's event loop
        busy, a command's own work between the two) before a waiting rank times out."""
        return self.timeout_s / 4


class TrainerConfig(Strict):
    """Everything `tidal trainer CONFIG` reads."""

    learner: LearnerConfig
    """Model, optimiser, loss, advantage estimator and packing (trainer/learner.py). Required: it
    names the model (`learner.model.path`), which has no default."""
    intake: IntakeConfig = msgspec.field(default_factory=IntakeConfig)
    checkpoint: CheckpointConfig = msgspec.field(default_factory=CheckpointConfig)
    publish: DiskPublish | DistributedPublish | NoPublish = msgspec.field(default_factory=DiskPublish)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    failures: FailuresConfig = msgspec.field(default_factory=FailuresConfig)
    distributed: DistributedConfig = msgspec.field(default_factory=DistributedConfig)
    max_steps: NonNegInt = 0
    """Stop (with a checkpoint) after this many optimizer steps in total; 0 runs until SIGTERM."""
    seed: int = 0
    """Seed of torch, numpy and random at a fresh start (a resume restores the saved RNG state)."""

    def resolved(self, device: str) -> "TrainerConfig":
        """This config as it runs on `device` (World.choose_device's answer): every "auto" replaced by
        what it chose, `distributed.device` and `learner.model.dtype`; `--print-config` shows this."""
        kind = "cpu" if device == "cpu" else "cuda"
        model = msgspec.structs.replace(self.learner.model, dtype=resolve_dtype(self.learner.model.dtype, kind))
        return msgspec.structs.replace(
            self, learner=msgspec.structs.replace(self.learner, model=model),
            distributed=msgspec.structs.replace(self.distributed, device=kind),
        )

    def __post_init__(self) -> None:
        if isinstance(self.learner.advantage, GRPOConfig | RLOOConfig) and self.intake.group_size < 2:
            raise ValueError(
                f"learner.advantage.type = {self.learner.advantage.__struct_config__.tag!r} compares members of "
                f"a group, so intake.group_size must be >= 2 (got {self.intake.group_size})"
            )
