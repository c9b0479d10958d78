"""`tidal engine` configuration: one Strict section per concern, loaded by `tidal.protocol.config.load_config`.

Defaults give a runnable engine on loopback against one SGLang server at 127.0.0.1:30000 and a trainer
at 127.0.0.1:5555/5556. The staleness bound and the batch size are not configured here: the trainer owns
them and sends them in every `TrainerStatus`, so engine and trainer can never disagree about them.
Cross-field rules run at load and name both fields.
"""

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta
from tidal.engine.backends.config import BackendConfig, SGLangConfig
from tidal.protocol.config import Strict

__all__ = [
    "ModelConfig",
    "TaskConfig",
    "SamplingConfig",
    "ChatAgentConfig",
    "PluginAgentConfig",
    "AgentConfig",
    "RolloutConfig",
    "EvalConfig",
    "TrainerLinkConfig",
    "EngineMetricsConfig",
    "EngineConfig",
]

PosInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
Seconds = Annotated[float, Meta(gt=0)]


class ModelConfig(Strict):
    """The checkpoint whose tokenizer and chat template the engine renders conversations with."""

    path: str = ""
    """Directory of the checkpoint the servers serve (tokenizer.json + the chat template). Required."""
    max_context: PosInt = 4096
    """Tokens an episode may hold in all (prompt, generations, observations): the model's context."""
    render_workers: NonNegInt = 0
    """Worker processes that render the chat template and encode observations off the event loop
    (engine/render_pool.py); 0 renders inline, right for small templates and a few hundred turns/s.
    Inline, an observation costs the loop's one thread 0.2-0.3 ms at 2.6k tokens with a Qwen2.5-like
    template and 0.5-2 ms with Qwen3's; through the workers ~0.12 ms whatever the template. Raise it
    when turns/s times the inline cost nears a tenth of a second per second (engine/loop_lag_ms climbs):
    Qwen2.5 past ~400 turns/s, Qwen3 past ~100. Each worker is one core and holds its own tokenizer;
    give them turns/s x the inline cost x 1.5 cores: at 2k turns/s 1-2 for Qwen2.5, 3-6 for Qwen3."""


class TaskConfig(Strict):
    """One source of tasks: an environment id and the seeds its episodes start from."""

    env: str
    """A registered env id (`tidal envs list`), e.g. "games:GuessTheNumber-v0"."""
    kwargs: dict[str, Any] = {}
    """Passed to `envs.make` (e.g. {difficulty = "easy"})."""
    seed_start: NonNegInt = 0
    """First task seed; an engine takes seed_start + engine_index, + engines, ... (disjoint across engines)."""
    seed_count: NonNegInt = 0
    """Distinct seeds before they repeat; 0: never repeat."""
    weight: Annotated[float, Meta(gt=0)] = 1.0
    """Share of the groups drawn from this source when there are several."""


class SamplingConfig(Strict):
    """How the model samples while acting. The learner scores the full vocabulary at temperature 1,
    so anything else is an acting policy the behaviour log-probs do not describe: restricted sampling
    (top_p < 1, top_k > 0) is warned about at start-up, as it silently stops learning."""

    temperature: Annotated[float, Meta(ge=0)] = 1.0
    top_p: Annotated[float, Meta(gt=0, le=1)] = 1.0
    top_k: int = -1
    """-1 (or 0): the whole vocabulary."""
    seed: int | None = None
    """Base sampling seed; each request adds its own offset so episodes stay reproducible."""

    @property
    def restricted(self) -> bool:
        return self.top_p < 1.0 or self.top_k > 0


class ChatAgentConfig(Strict, tag="chat", tag_field="type"):
    """The default multi-turn chat agent (engine/agent.py): render, generate, decode, step, repeat."""

    system_prompt: str | None = None
    """A system message before the env's first observation (None: none)."""
    max_turns: PosInt = 8
    """Agent turns per episode at most (the horizon schedule may lower it)."""
    max_new_tokens: PosInt = 256
    """Tokens one generation may produce."""
    max_episode_tokens: PosInt = 4096
    """Generated tokens an episode may produce in all (its token budget)."""
    step_timeout_s: Seconds = 60.0
    """An env step that takes longer ends the episode ("step_timeout")."""
    use_info_suffix: bool = True
    """Append an env's `info["suffix"]` (GEM's prompt for the next move) to its observation."""


class PluginAgentConfig(Strict, tag="plugin", tag_field="type"):
    """An agent registered by another package under the entry-point group `tidal.agents`."""

    name: str
    """The entry point's name."""
    options: dict[str, Any] = {}
    """Validated against the agent class's `config_type`."""


AgentConfig = ChatAgentConfig | PluginAgentConfig


class RolloutConfig(Strict):
    """Scheduling: how many episodes run, how they group, and what is filtered before the trainer."""

    group_size: PosInt = 4
    """Episodes per task seed, one group for GRPO/RLOO/ReBN; must equal the trainer's intake.group_size."""
    max_concurrent: PosInt = 256
    """Episodes in flight at most (admission waits beyond it)."""
    mode: Literal["async", "sync"] = "async"
    """async: admit within the trainer's staleness bound while older episodes finish. sync: the classic
    loop, through the same code: a whole batch is generated under one policy version, handed over, and
    the next starts only once the servers serve the trainer's new version (needs max_staleness = 0)."""
    horizon: list[tuple[NonNegInt, PosInt]] = []
    """Interaction-horizon schedule (ScalingInter-RL): [[version, max_turns], ...]; from each version on,
    episodes get at most that many turns. Empty: agent.max_turns throughout."""
    drop_zero_variance: bool = False
    """Drop groups whose rewards are all equal (no signal for group-relative advantages); counted."""
    engines: PosInt = 1
    """Engine processes sharing the task seeds (with engine_index, each takes a disjoint slice)."""
    engine_index: NonNegInt = 0
    """This engine's index among `engines`."""

    def __post_init__(self) -> None:
        if self.engine_index >= self.engines:
            raise ValueError(f"rollout.engine_index ({self.engine_index}) must be < rollout.engines ({self.engines})")
        versions = [v for v, _ in self.horizon]
        if versions != sorted(set(versions)):
            raise ValueError(f"rollout.horizon: versions must increase, got {versions}")

    def max_turns_at(self, version: int, default: int) -> int:
        """The horizon schedule's turn limit for episodes started at trainer `version`."""
        turns = default
        for since, limit in self.horizon:
            if version >= since:
                turns = limit
        return turns


class EvalConfig(Strict):
    """A periodic evaluation on held-out task seeds: its success rate is the figure a run reports.

    Eval episodes use the first task source's env, seeds from `seed_start` (far from the training
    seeds), the agent's turn limit at that version, and sampling at `temperature` (0: greedy, the
    policy's most likely move). They are not sent to the trainer and take no admission; only engine 0
    of several runs them. Success: an episode one of whose turns earned at least `success_reward`."""

    every_versions: NonNegInt = 0
    """Evaluate when the servers first serve a multiple of this version (and at the start); 0: never."""
    episodes: PosInt = 64
    """Episodes per evaluation, on seeds seed_start .. seed_start + episodes - 1 every time."""
    seed_start: NonNegInt = 1_000_000_000
    temperature: Annotated[float, Meta(ge=0)] = 0.0
    success_reward: float = 1.0


class TrainerLinkConfig(Strict):
    """The trainer's two channels, and where finished trajectories wait while it is away."""

    endpoint: str = "tcp://127.0.0.1:5555"
    """The trainer's trajectory endpoint (its intake.endpoint)."""
    status_endpoint: str = "tcp://127.0.0.1:5556"
    """The trainer's status endpoint (its intake.status_endpoint)."""
    window: PosInt = 1024
    """Trajectories sent but not yet committed held in memory at most. The trainer commits at its
    checkpoints, so more than a checkpoint interval's worth wait; what exceeds the window waits in the
    spool on disk, and the spool's bound is what stops new episodes."""
    spool_dir: str = "runs/engine/spool"
    """Write-ahead spool of finished trajectories (resent after a restart until committed)."""
    max_spool_mb: Annotated[float, Meta(gt=0)] = 1024.0
    """Spool size at which new episodes stop starting (back-pressure, never a drop)."""
    status_timeout_s: Seconds = 10.0
    """No status from the trainer for this long: admission stops until it is heard again."""
    curve_secret_key: str = ""
    """CURVE across hosts: this engine's `.key_secret` file from `tidal keys` ("" with curve_server_key
    "": no encryption, for loopback). Set both or neither."""
    curve_server_key: str = ""
    """CURVE across hosts: the trainer's public `trainer.key` file from `tidal keys`."""


class EngineMetricsConfig(Strict):
    """Where the engine's metrics go."""

    jsonl: str = "runs/engine/metrics.jsonl"
    """One JSON object every `every_s` seconds; "" to disable."""
    every_s: Seconds = 5.0
    prometheus_port: int = -1
    """Port of the Prometheus endpoint on 127.0.0.1 (0 picks one, -1 disables)."""
    console: bool = True
    """Show a rich live status line on stderr."""
    ledger: bool = False
    """Also write a `spooled` record with the ids of each finished group once it is on disk, and a
    `recovered` record with those an earlier run left in the spool: the engine's half of the ledger
    `tidal bench soak` reads to find lost trajectories (a line per group)."""


class EngineConfig(Strict):
    """Everything `tidal engine CONFIG` reads."""

    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    tasks: list[TaskConfig] = msgspec.field(default_factory=lambda: [TaskConfig(env="games:GuessTheNumber-v0")])
    """Task sources; groups are drawn from them by weight."""
    backend: BackendConfig = msgspec.field(default_factory=SGLangConfig)
    agent: AgentConfig = msgspec.field(default_factory=ChatAgentConfig)
    sampling: SamplingConfig = msgspec.field(default_factory=SamplingConfig)
    rollout: RolloutConfig = msgspec.field(default_factory=RolloutConfig)
    eval: EvalConfig = msgspec.field(default_factory=EvalConfig)
    trainer: TrainerLinkConfig = msgspec.field(default_factory=TrainerLinkConfig)
    metrics: EngineMetricsConfig = msgspec.field(default_factory=EngineMetricsConfig)
    engine_id: str = ""
    """Names this engine's trajectory stream and ids; "" = engine-<rollout.engine_index>."""
    max_episodes: NonNegInt = 0
    """Stop (draining) after this many episodes have started; 0 runs until SIGTERM or Shutdown."""
    seed: int = 0
    """Seeds the engine's own choices (task source order) so a run is reproducible."""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: at least one task source is needed")
        if self.max_episodes and self.max_episodes % self.rollout.group_size:
            raise ValueError(
                f"max_episodes ({self.max_episodes}) must be a multiple of rollout.group_size ({self.rollout.group_size})"
            )

    @property
    def name(self) -> str:
        return self.engine_id or f"engine-{self.rollout.engine_index}"
