r"""What every text game shares: difficulty presets, the turn count, `\boxed{}` moves, penalties.

A game subclasses `TextGame` and writes four things: `PRESETS` (difficulty -> parameters), `_new_game`
(draw a puzzle from `self.rng`), `_parse` (an action's `\boxed{}` content -> a move, or an error
`Invalid` saying what a well-formed move looks like) and `_play` (a move -> feedback, reward, and
whether the game ended: solved, or lost as by hitting a mine).
Rewards follow GEM's `LanguageGameReward`: 1.0 for solving, 0.0 for other moves, −0.1 for a
malformed action. A malformed action costs its turn, gets feedback naming the expected format, and
does not end the episode. Running out of turns truncates it (terminated=False, truncated=True).

Invariant: everything random is drawn from `self.rng`, seeded by `reset(seed)`, so a seed fixes the
episode and concurrent games never share RNG state.
"""

import functools
import random
from typing import Any, ClassVar

from tidal.envs.answers import clip, extract_boxed
from tidal.envs.core import Env, StepResult

__all__ = ["TextGame", "Invalid", "SUCCESS_REWARD", "STEP_REWARD", "FORMAT_ERROR_REWARD"]

SUCCESS_REWARD = 1.0
STEP_REWARD = 0.0
FORMAT_ERROR_REWARD = -0.1
"""GEM's format-error penalty, so reward scales match between our games and GEM's."""


class Invalid(str):
    """Returned by `_parse` to reject a move; the text says what a well-formed move looks like."""


class TextGame(Env):
    """A turn-based puzzle spoken in text; moves are written as `\\boxed{...}`."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    """Difficulty name -> constructor parameters (including `max_turns`)."""

    name: ClassVar[str] = ""
    suffix: ClassVar[str] = "Enter your next move."
    """GEM's per-turn reminder, returned as `info["suffix"]`."""

    def __init__(self, difficulty: str = "easy", **params: Any):
        if difficulty not in self.PRESETS:
            raise ValueError(f"{self.name}: difficulty must be one of {sorted(self.PRESETS)}, got {difficulty!r}")
        merged = {**self.PRESETS[difficulty], **{k: v for k, v in params.items() if v is not None}}
        unknown = set(merged) - set(self.PRESETS[difficulty])
        if unknown:
            raise ValueError(f"{self.name}: unknown parameters {sorted(unknown)}; known: {sorted(self.PRESETS[difficulty])}")
        self.difficulty = difficulty
        self.params = merged
        self.max_turns: int = merged["max_turns"]
        if self.max_turns < 1:
            raise ValueError(f"{self.name}: max_turns must be >= 1, got {self.max_turns}")
        self._configure(**{k: v for k, v in merged.items() if k != "max_turns"})
        self.rng = random.Random(0)
        self.turn = 0
        self.done = True

    def _configure(self, **params: Any) -> None:
        """Validate and store the game's parameters (everything but max_turns)."""

    def _new_game(self) -> None:
        raise NotImplementedError

    def _parse(self, move: str) -> Any:
        """A `\\boxed{}` content -> a move; return `Invalid(message)` to reject it as malformed."""
        raise NotImplementedError

    def _play(self, move: Any) -> tuple[str, float, bool]:
        """Apply a well-formed move: (feedback, reward, ended). Illegal moves are feedback, reward 0."""
        raise NotImplementedError

    @functools.cached_property
    def _format_hint(self) -> str:
        return self.sample_action(random.Random("format hint"))

    @functools.cached_property
    def instructions(self) -> str:  # type: ignore[override]
        return self._rules() + (
            f"\nYou have {self.max_turns} turns. Think if you like, then write your move inside "
            f"\\boxed{{}}, for example {self._format_hint}; only the last \\boxed{{}} counts."
        )

    def _rules(self) -> str:
        raise NotImplementedError

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed)
        self.turn = 0
        self.done = False
        self._new_game()
        return self._first_observation, {"suffix": self.suffix}

    @functools.cached_property
    def _first_observation(self) -> str:
        return f"{self.instructions}\nEnter your first move."

    def step(self, action: str) -> StepResult:
        if self.done:
            return "The game is over; call reset to play again.", 0.0, True, False, {"suffix": self.suffix}
        self.turn += 1
        content = extract_boxed(action) if isinstance(action, str) else None
        move = self._parse(content) if content is not None else None
        if content is None or isinstance(move, Invalid):
            why = move if isinstance(move, Invalid) else f"no \\boxed{{...}} move found in {clip(str(action))!r}"
            obs, reward, ended = f"Turn {self.turn}: invalid move: {why}. Write e.g. {self._format_hint}.", FORMAT_ERROR_REWARD, False
            info = {"suffix": self.suffix, "invalid": True}
        else:
            obs, reward, ended = self._play(move)
            obs = f"Turn {self.turn}: {obs}"
            info = {"suffix": self.suffix}
        truncated = not ended and self.turn >= self.max_turns
        if truncated:
            obs += f"\nYou have used all {self.max_turns} turns. {self._reveal()}"
        self.done = ended or truncated
        return obs, reward, ended, truncated, info

    def _reveal(self) -> str:
        """What the answer was, shown when the turns run out."""
        return ""
