"""`tidal run` configuration: one experiment in one file, the three daemons' own configs inside it.

`RunConfig` embeds each daemon's config type as it is (`inference` is `tidal serve`'s ServeConfig or an
SGLang launch or external URLs; `trainer` is TrainerConfig; `engine` is EngineConfig), so every key a
daemon documents is set the same way here (`--set trainer.learner.optim.lr=3e-4`). What ties the
three together is set by `tidal run`, never by hand, so they cannot disagree:
- the model: `[model]` names it once (or builds it); the sections' own model paths stay empty;
- the wiring: the engine's server URLs and trainer endpoints are the ones the children bound
  (the trainer binds port 0 and its `ready` record names the ports);
- the files: metrics, checkpoints, weights, the spool and the dead letter go under the run dir;
- `sync = true`: the engine's rollout.mode = "sync" and the trainer's intake.max_staleness = 0.
Cross-field rules run at load and name both keys.

Importing this module imports torch: TrainerConfig's learner section lives beside the Learner
(trainer/learner.py). Only the `tidal run` parent imports it; the engine process never does.
"""

import time
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta
from tidal.engine.backends.config import PluginConfig, SGLangConfig
from tidal.engine.config import (
    ChatAgentConfig,
    EngineConfig,
    EngineMetricsConfig,
    EvalConfig,
    ModelConfig,
    RolloutConfig,
    SamplingConfig,
    TaskConfig,
)
from tidal.engine.reference.config import ServeConfig, ServerSection
from tidal.protocol.config import Strict
from tidal.trainer.advantages import ReBNConfig
from tidal.trainer.config import (
    CheckpointConfig,
    DiskPublish,
    IntakeConfig,
    MetricsConfig,
    TrainerConfig,
)
from tidal.trainer.learner_config import DecoupledPPOConfig, LearnerConfig, OptimConfig
from tidal.trainer.learner_config import ModelConfig as LearnerModelConfig

__all__ = [
    "RunModelConfig",
    "ReferenceInference",
    "SGLangInference",
    "ExternalInference",
    "RestartConfig",
    "ConsoleConfig",
    "PlotsConfig",
    "WandbConfig",
    "TensorBoardConfig",
    "RunConfig",
    "TINY_BUILDER",
    "TASK_BUILDER",
]

NonNegInt = Annotated[int, Meta(ge=0)]
Seconds = Annotated[float, Meta(gt=0)]

TINY_BUILDER = "tidal.engine.reference.tiny:build_tiny_model"
"""A 2-layer random Llama and a byte tokenizer (the test model; it generates noise)."""
TASK_BUILDER = "tidal.engine.reference.task_model:build_task_model"
"""The model-building step of the CPU default: a 2-layer random Llama over a word-level vocabulary of
the default game's words, so that a move is one token."""


class RunModelConfig(Strict):
    """The one model the server serves, the engine renders with and the trainer trains."""

    path: str = ""
    """A checkpoint directory, or a Hugging Face hub id (downloaded into the hub cache first); "" builds
    one (build_tiny)."""
    build_tiny: bool | None = None
    """Build a model into <run_dir>/model before anything starts and use it by path (a resumed run
    reuses it); the step is `builder`, run in a child process. Not set: build when `path` is "". """
    builder: str = TASK_BUILDER
    """The model-building step: "module:function" called as function(path, **builder_kwargs) to write
    a checkpoint (weights, config, tokenizer with a chat template) into `path`. An experiment's own
    model-building step goes here."""
    builder_kwargs: dict[str, Any] = {}
    """Keyword arguments of `builder` (the tiny model: layers, hidden, seed)."""

    def __post_init__(self) -> None:
        if self.build_tiny is not None and bool(self.path) == self.build_tiny:
            raise ValueError(f"model: give either model.path (a checkpoint) or model.build_tiny = true, not "
                             f"{'both' if self.path else 'neither'} (path = {self.path!r}, build_tiny = "
                             f"{str(self.build_tiny).lower()})")
        if self.builds and ":" not in self.builder:
            raise ValueError(f"model.builder: expected \"module:function\", got {self.builder!r}")

    @property
    def builds(self) -> bool:
        """Whether the run builds its model (build_tiny, or no path given)."""
        return self.build_tiny if self.build_tiny is not None else not self.path


class ReferenceInference(ServeConfig, tag="reference", tag_field="type"):
    """`tidal serve`, the CPU reference server, as a child; the keys are its own (`tidal serve
    --print-config`). tidal run sets model.path from [model]; server.port 0 binds a free port, which a
    restarted server binds again."""

    server: ServerSection = msgspec.field(default_factory=lambda: ServerSection(port=0))


class SGLangInference(Strict, tag="sglang", tag_field="type"):
    """`python -m sglang.launch_server` as a child (a GPU machine with the sglang package). tidal run
    adds --model-path, --host, --port and --weight-version; ready once /model_info answers."""

    args: list[str] = []
    """Further launch_server arguments, e.g. ["--mem-fraction-static", "0.6", "--tp-size", "1"]."""
    host: str = "127.0.0.1"
    """Address the server binds (loopback unless you mean otherwise)."""
    port: Annotated[int, Meta(ge=1, le=65535)] = 30000
    """Port the server binds (SGLang cannot pick a free one)."""
    python: str = ""
    """Interpreter with sglang installed; "" = the one running tidal."""
    env: dict[str, str] = {}
    """Extra environment of the server, e.g. {CUDA_VISIBLE_DEVICES = "0"}."""


class ExternalInference(Strict, tag="external", tag_field="type"):
    """Servers started elsewhere (SGLang, or `tidal serve`); tidal run starts none. They must serve
    [model] and read the trainer's published weights (publish.dir) at the same path."""

    urls: Annotated[list[str], Meta(min_length=1)]
    """Base URLs, e.g. ["http://10.0.0.5:30000"]; the engine's backend.urls are set to these."""


Inference = ReferenceInference | SGLangInference | ExternalInference


class RestartConfig(Strict):
    """What a child that dies does to the run."""

    max_restarts: NonNegInt = 3
    """Restarts of each child (server, trainer, engine) before the run stops with an error; 0 stops at
    the first death. The engine and trainer resume by themselves from spool and checkpoint. A child
    that exits with code 2 (a start-up or configuration error) is never restarted."""
    ready_timeout_s: Seconds = 900.0
    """A child not ready this long after it started has failed (a model download or load included)."""
    stop_timeout_s: Seconds = 90.0
    """On stop, a child gets SIGTERM and this long to finish (the engine drains, the trainer writes a
    checkpoint) before SIGKILL."""
    backoff_s: Annotated[float, Meta(ge=0)] = 1.0
    """Pause before a restart."""
    stall_timeout_s: Annotated[float, Meta(ge=0)] = 1800.0
    """The run fails (exit code 1, quoting the engine's latest figures and each child's last log
    lines) when the trainer takes no step for this long while its children run: a run that cannot
    learn (all its data dropped as stale, say) ends instead of hanging. Counted from the trainer's
    latest step, the end of start-up or the latest restart; 0: never."""


class ConsoleConfig(Strict):
    """The live status of the run on the terminal."""

    mode: Literal["auto", "live", "lines", "off"] = "auto"
    """live: a rich table redrawn in place; lines: one status line every `every_s`; auto: live on a
    terminal, else lines."""
    every_s: Seconds = 10.0
    """Period of a status line (the live table redraws every second)."""


class PlotsConfig(Strict):
    """PNG plots from the metrics JSONL files, in <run_dir>/plots (needs matplotlib: the train extra)."""

    enabled: bool = True
    every_s: Annotated[float, Meta(ge=0)] = 60.0
    """Redraw during the run this often (in a child process); 0: only at the end."""


class WandbConfig(Strict):
    """Every metric record of the engine and the trainer, forwarded to Weights & Biases (the wandb extra)."""

    mode: Literal["disabled", "offline", "online"] = "disabled"
    """offline: written under <run_dir>/wandb for `wandb sync`, no network; online: streamed."""
    project: str = "tidal"
    entity: str | None = None
    name: str = ""
    """Run name; "" = the run dir's name."""
    tags: list[str] = []


class TensorBoardConfig(Strict):
    """Every metric record of the engine and the trainer as TensorBoard scalars in <run_dir>/tensorboard
    (needs the tensorboard package: the tensorboard extra)."""

    enabled: bool = False


# --- the default experiment ------------------------------------------------------------------------
# The CPU default: a random 2-layer, 256-wide Llama whose vocabulary is the game's words (TASK_BUILDER)
# learns GuessTheNumber 1-8 in 4 turns, one token per move, with terse feedback ("guess 1-8", "higher",
# "lower", "correct"). Greedy eval success goes from ~0.25 to 1.0 (binary search) in 45-90 steps
# of 256 episodes; the whole run of 150 steps takes about 3 minutes on two cores. Why each
# value (measured):
# - ReBN with gamma 0.8 rewards solving in fewer turns, the signal that tells binary search apart from
#   strategies that solve 7 of the 8 numbers; GRPO stalled there in half the seeds.
# - 8 optimiser updates of 32 episodes per step: small updates learn per episode, a large step
#   amortises publishing and weight loading; the cosine decay lets the greedy policy settle.
# - lr 5e-4 with that decay for the 256-wide model (engine/reference/task_model.py says why that width):
#   at 2e-3, which suited a 64-wide one, it did not learn (0.11 at step 60); at 1e-3 it learned slower.
#   With the 64-wide model a constant 2e-3, or 3e-3, made some runs collapse to a deterministic,
#   wrong policy (a gradient spike, then entropy near 0 and nothing left to learn from).
# - An entropy bonus of 0.02. Without one about a third of the runs (4 of 12, sync and async alike)
#   ended at 0.84: the policy turned deterministic (p 0.99) on a search tree that misses one number
#   (3, 7, 4, 6 never finds 5), the branch whose other choice solves it was no longer sampled, and
#   the decaying lr froze it there. At 0.01, 2 async runs of 19 still settled at 0.875-0.89; at
#   0.02 none has.
# - Max staleness 2, two batches in flight: with 1, generation and training took turns at each
#   version's boundary and async used about 90% of what two cores allow; with 2 the engine runs a
#   batch ahead and the decoupled objective corrects the older tokens (docs/performance.md).


GUESS_TASK = {"low": 1, "high": 8, "max_turns": 4, "moves": "bare", "terse": True}
"""GuessTheNumber as the CPU default plays it: the words of task_model.GUESS_WORDS, one token a move."""


def _default_engine() -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(max_context=512),
        tasks=[TaskConfig(env="games:GuessTheNumber-v0", kwargs=dict(GUESS_TASK))],
        agent=ChatAgentConfig(max_turns=4, max_new_tokens=1),
        sampling=SamplingConfig(seed=0),
        backend=SGLangConfig(coalesce=64),
        rollout=RolloutConfig(group_size=4, max_concurrent=512),
        eval=EvalConfig(every_versions=5, episodes=64),
        metrics=EngineMetricsConfig(every_s=2.0, console=False),
    )


def _default_trainer() -> TrainerConfig:
    return TrainerConfig(
        learner=LearnerConfig(
            model=LearnerModelConfig(path="", dtype="float32"),
            optim=OptimConfig(lr=5e-4, minibatches=8, schedule="cosine", total_steps=1200, min_lr_ratio=0.1),
            advantage=ReBNConfig(gamma=0.8),
            loss=DecoupledPPOConfig(entropy_coef=0.02),
        ),
        intake=IntakeConfig(batch_size=256, group_size=4, max_staleness=2, capacity=1024, max_uncommitted=768),
        checkpoint=CheckpointConfig(every_steps=10),
        metrics=MetricsConfig(console=False),
    )


class RunConfig(Strict):
    """Everything `tidal run CONFIG` reads: one experiment, end to end."""

    run_dir: str = ""
    """Directory of everything the run writes; "" = runs/<date>-<time>. A directory holding a run
    resumes it (the trainer from its checkpoint, the engine from its spool)."""
    model: RunModelConfig = msgspec.field(default_factory=RunModelConfig)
    inference: Inference = msgspec.field(default_factory=ReferenceInference)
    """The inference server(s): type = "reference" (tidal serve), "sglang" (launched) or "external"."""
    trainer: TrainerConfig = msgspec.field(default_factory=_default_trainer)
    """`tidal trainer`'s config (`tidal trainer --print-config`); its model, endpoints and files are
    set by tidal run."""
    engine: EngineConfig = msgspec.field(default_factory=_default_engine)
    """`tidal engine`'s config (`tidal engine --print-config`); its model, servers, trainer link and
    files are set by tidal run."""
    trainer_launch: list[str] = []
    """How the trainer starts: the arguments after the Python interpreter, its config file appended.
    [] = ["-m", "tidal", "trainer"]; under torchrun, e.g. ["-m", "torch.distributed.run", "--standalone",
    "--nproc-per-node", "2", "-m", "tidal.trainer"]."""
    sync: bool = False
    """Synchronous rollouts, the classic loop (the engine's rollout.mode = "sync", the trainer's
    intake.max_staleness = 0); `tidal run --sync` sets it."""
    max_steps: NonNegInt = 150
    """Stop after this many trainer steps (the trainer's max_steps); 0: no limit."""
    max_minutes: Annotated[float, Meta(ge=0)] = 15.0
    """Stop after this much wall-clock time; 0: no limit."""
    restart: RestartConfig = msgspec.field(default_factory=RestartConfig)
    console: ConsoleConfig = msgspec.field(default_factory=ConsoleConfig)
    plots: PlotsConfig = msgspec.field(default_factory=PlotsConfig)
    wandb: WandbConfig = msgspec.field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = msgspec.field(default_factory=TensorBoardConfig)

    def __post_init__(self) -> None:
        e, t = self.engine, self.trainer
        given = {"engine.model.path": e.model.path, "trainer.learner.model.path": t.learner.model.path}
        if isinstance(self.inference, ReferenceInference):
            given["inference.model.path"] = self.inference.model.path or ""
        for key, value in given.items():
            if value:
                raise ValueError(f"{key} = {value!r}: tidal run sets it from model.path; name the model "
                                 "there (or model.build_tiny = true) and leave it empty")
        if e.rollout.group_size != t.intake.group_size:
            raise ValueError(f"engine.rollout.group_size ({e.rollout.group_size}) must equal "
                             f"trainer.intake.group_size ({t.intake.group_size})")
        if not self.sync and e.rollout.mode == "sync" and t.intake.max_staleness:
            raise ValueError(f"engine.rollout.mode = 'sync' needs trainer.intake.max_staleness = 0 (got "
                             f"{t.intake.max_staleness}); or set sync = true, which sets both")
        if t.max_steps and self.max_steps and t.max_steps != self.max_steps:
            raise ValueError(f"trainer.max_steps ({t.max_steps}) and max_steps ({self.max_steps}) differ; "
                             "set max_steps only")
        if isinstance(e.backend, PluginConfig) and not isinstance(self.inference, ExternalInference):
            kind = type(self.inference).__struct_config__.tag
            raise ValueError(f"engine.backend.type = 'plugin' cannot reach the {kind} server "
                             "tidal run starts; use the sglang or openai backend, or inference.type = 'external'")
        if e.rollout.engines != 1:
            raise ValueError(f"engine.rollout.engines = {e.rollout.engines}: tidal run starts one engine; run "
                             "more with `tidal engine` (examples/ shows how)")

    def resolved_run_dir(self, now: float | None = None) -> Path:
        """`run_dir`, or runs/<date>-<time> of `now`."""
        if self.run_dir:
            return Path(self.run_dir)
        return Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.localtime(now))


# --- the children's configs ------------------------------------------------------------------------


class Layout:
    """Where a run's files go, under its run dir."""

    def __init__(self, run_dir: Path):
        self.root = run_dir
        self.config = run_dir / "config.toml"
        self.events = run_dir / "run.jsonl"
        self.model = run_dir / "model"
        self.configs = run_dir / "configs"
        self.logs = run_dir / "logs"
        self.metrics = run_dir / "metrics"
        self.engine_jsonl = self.metrics / "engine.jsonl"
        self.trainer_jsonl = self.metrics / "trainer.jsonl"
        self.checkpoints = run_dir / "checkpoints"
        self.weights = run_dir / "weights"
        self.spool = run_dir / "spool"
        self.dead_letter = run_dir / "dead_letter.jsonl"
        self.plots = run_dir / "plots"
        self.wandb = run_dir / "wandb"
        self.tensorboard = run_dir / "tensorboard"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"


def serve_config(cfg: RunConfig, model_path: str, *, port: int | None = None, weights: Path | None = None,
                 version: int | None = None) -> ServeConfig:
    """`tidal serve`'s config for the reference server: the run's model, or after a restart the newest
    published weights at their version, so the server comes back in step with the trainer."""
    ref = cfg.inference
    assert isinstance(ref, ReferenceInference)
    server = ref.server
    if port is not None:
        server = msgspec.structs.replace(server, port=port)
    if version is not None:
        server = msgspec.structs.replace(server, weight_version=str(version))
    model = msgspec.structs.replace(ref.model, path=str(weights or model_path))
    return ServeConfig(mode=ref.mode, server=server, model=model, simulate=ref.simulate)


def trainer_config(cfg: RunConfig, layout: Layout, model_path: str) -> TrainerConfig:
    """`tidal trainer`'s config: the run's model, its files in the run dir, endpoints on port 0 (read back
    from its `ready` record), max_steps and the sync setting of the run."""
    t = cfg.trainer
    learner = msgspec.structs.replace(t.learner, model=msgspec.structs.replace(t.learner.model, path=model_path))
    intake = msgspec.structs.replace(t.intake, endpoint="tcp://127.0.0.1:0", status_endpoint="tcp://127.0.0.1:0")
    if cfg.sync:
        intake = msgspec.structs.replace(intake, max_staleness=0)
    publish = t.publish
    if isinstance(publish, DiskPublish):
        publish = msgspec.structs.replace(publish, dir=str(layout.weights))
    return msgspec.structs.replace(
        t, learner=learner, intake=intake, publish=publish,
        checkpoint=msgspec.structs.replace(t.checkpoint, dir=str(layout.checkpoints)),
        metrics=msgspec.structs.replace(t.metrics, jsonl=str(layout.trainer_jsonl)),
        failures=msgspec.structs.replace(t.failures, dead_letter=str(layout.dead_letter)),
        max_steps=cfg.max_steps or t.max_steps,
    )


def engine_config(cfg: RunConfig, layout: Layout, model_path: str, servers: list[str],
                  endpoint: str, status_endpoint: str) -> EngineConfig:
    """`tidal engine`'s config: the run's model, the servers and trainer endpoints the children bound,
    its files in the run dir, and the sync setting of the run."""
    e = cfg.engine
    backend = e.backend
    if not isinstance(backend, PluginConfig):
        backend = msgspec.structs.replace(backend, urls=list(servers))
        if isinstance(backend, SGLangConfig) and backend.control_urls:
            backend = msgspec.structs.replace(backend, control_urls=[])
    rollout = msgspec.structs.replace(e.rollout, mode="sync") if cfg.sync else e.rollout
    return msgspec.structs.replace(
        e, model=msgspec.structs.replace(e.model, path=model_path), backend=backend, rollout=rollout,
        trainer=msgspec.structs.replace(e.trainer, endpoint=endpoint, status_endpoint=status_endpoint,
                                        spool_dir=str(layout.spool)),
        metrics=msgspec.structs.replace(e.metrics, jsonl=str(layout.engine_jsonl)),
    )
