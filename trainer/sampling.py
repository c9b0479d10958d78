"""Whether a trajectory was sampled from the policy the learner scores (the off-policy correction's premise).

The behaviour log-probability mu the engine records is the full-vocabulary log_softmax(logits / T) of
the sampled token, as SGLang reports it: before top-k, top-p or min-p truncation and before a logit
mask, but after the repetition/frequency/presence penalties. The learner scores the full vocabulary
at the same temperature (trainer/learner.py applies each trajectory's own `sampling["temperature"]`).
Anything else the engine sampled with makes the acting policy a different one than mu describes:

- top_p < 1, 0 < top_k < vocabulary, min_p > 0, a logit mask: the draw came from a truncated,
  renormalised distribution, so mu under-states the probability of every token that was drawn;
- penalties: mu includes them, pi_theta cannot (it sees no sampling state), so pi_prox / mu is off;
- temperature 0 (greedy): the draw is deterministic, mu is log_softmax(logits) at T = 1.

The importance weights min(pi_prox / mu, C) then correct towards the wrong policy: an independent
check on GuessTheNumber with top_p < 1 did not learn at all. The trainer does not reject such data
(it may be deliberate), but counts it and says so loudly. Train with top_p = 1, top_k = -1 (or 0),
min_p = 0, no penalties and no mask.

`restrictions` is a pure function of one record; `SamplingMonitor` the pure state machine the daemon
feeds each step's batch (count, when to warn, what health says).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tidal.protocol.messages import Trajectory

__all__ = ["GREEDY_BELOW", "WARN_EVERY", "restrictions", "temperature", "SamplingMonitor"]

GREEDY_BELOW = 1e-6
"""A temperature below this is greedy decoding, as in SGLang and the reference server: they report
log-probabilities at T = 1 then, so the learner scores greedy trajectories at T = 1 as well."""

WARN_EVERY = 256
"""After the first warning, warn again each time this many more restricted trajectories have been
trained on: loud enough to be seen in a long log, not a line per step."""

ADVICE = ("the learner scores the full vocabulary and cannot reproduce the acting policy, so its importance "
          "weights correct towards the wrong policy and learning can stall; sample with top_p = 1, "
          "top_k = -1 (or 0), min_p = 0, no penalties and no logit mask")


def restrictions(sampling: Mapping[str, float | int | bool], vocab_size: int | None = None) -> list[str]:
    """The settings of one `Trajectory.sampling` record that the learner cannot reproduce, as
    "name=value" strings; [] when the trajectory was sampled from the full tempered distribution
    (or recorded nothing). Keys it does not know are ignored (a newer engine may record more).

    >>> restrictions({"temperature": 1.0, "top_p": 0.9, "top_k": -1})
    ['top_p=0.9']
    >>> restrictions({"top_k": 50, "masked": True}, vocab_size=32000), restrictions({"top_k": 50}, vocab_size=40)
    (['top_k=50', 'masked'], [])
    """
    found = []
    t = sampling.get("temperature")
    if t is not None and t < GREEDY_BELOW:
        found.append(f"temperature={t} (greedy)")
    if sampling.get("top_p", 1.0) < 1.0:
        found.append(f"top_p={sampling['top_p']}")
    k = sampling.get("top_k", -1)
    if k > 0 and (vocab_size is None or k < vocab_size):
        found.append(f"top_k={k}")
    if sampling.get("min_p", 0.0) > 0.0:
        found.append(f"min_p={sampling['min_p']}")
    for name, neutral in (("repetition_penalty", 1.0), ("frequency_penalty", 0.0), ("presence_penalty", 0.0)):
        if sampling.get(name, neutral) != neutral:
            found.append(f"{name}={sampling[name]}")
    if sampling.get("masked", False):
        found.append("masked")
    return found


def temperature(sampling: Mapping[str, float | int | bool], default: float) -> float:
    """The temperature the learner divides a trajectory's logits by: the one it was sampled at (T = 1
    when greedy, see GREEDY_BELOW), or `default` (learner.model.temperature) when it recorded none."""
    t = sampling.get("temperature")
    if t is None:
        return default
    return float(t) if t >= GREEDY_BELOW else 1.0


class SamplingMonitor:
    """Counts trained trajectories whose sampling the learner cannot reproduce; says when to warn.

    `restricted` is cumulative (the daemon checkpoints it with its counters); `last` is the number in
    the most recent batch, which is what health reports: health returns to "ok" once the engines
    sample from the full distribution again.
    """

    def __init__(self, restricted: int = 0, *, vocab_size: int | None = None, warn_every: int = WARN_EVERY):
        self.restricted = restricted
        self.last = 0
        self.last_settings: list[str] = []
        self.vocab_size = vocab_size
        self.warn_every = warn_every
        self._warned_at: int | None = None
        """`restricted` when the last warning was given (None: never, in this process)."""

    def observe(self, batch: Sequence[Trajectory]) -> str | None:
        """Count `batch`'s restricted trajectories; the warning to log now, or None."""
        settings: dict[str, int] = {}
        examples: list[str] = []
        self.last = 0
        for traj in batch:
            found = restrictions(traj.sampling, self.vocab_size) if traj.sampling else []
            if found:
                self.last += 1
                if len(examples) < 3:
                    examples.append(traj.id)
                for s in found:
                    settings[s] = settings.get(s, 0) + 1
        if not self.last:
            self.last_settings = []
            return None
        self.restricted += self.last
        self.last_settings = sorted(settings, key=lambda s: -settings[s])
        due = self._warned_at is None or self.restricted - self._warned_at >= self.warn_every
        if not due:
            return None
        self._warned_at = self.restricted
        return (f"restricted sampling: {self.last} of {len(batch)} trajectories in this batch "
                f"({self.restricted} in all) were sampled with {', '.join(self.last_settings)} "
                f"(e.g. {', '.join(examples)}): {ADVICE}. Warned again every {self.warn_every} such trajectories.")

    @property
    def health(self) -> str | None:
        """`TrainerStatus.health` while the latest batch held restricted trajectories, else None."""
        if not self.last:
            return None
        return f"warn: restricted sampling ({', '.join(self.last_settings)})"[:200]
