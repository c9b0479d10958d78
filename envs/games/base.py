r"""What every text game shares: difficulty presets, the turn count, how moves are written, penalties.

A game subclasses `TextGame` and writes four things: `PRESETS` (difficulty -> parameters), `_new_game`
(draw a puzzle from `self.rng`), `_parse` (a move's text -> a move, or an error `Invalid` saying what
a well-formed move looks like) and `_play` (a move -> feedback, reward, and whether the game ended:
solved, or lost as by hitting a mine).
Rewards follow GEM's `LanguageGameReward`: 1.0 for solving, 0.0 for other moves, −0.1 for a
malformed action. A malformed action costs its turn, gets feedback naming the expected format, and
does not end the episode. Running out of turns truncates it (terminated=False, truncated=True).

Two options shape the text for small models, every game alike:
- `moves`: "boxed" (default, as GEM) reads the last `\boxed{...}` of the action; "bare" reads the
  whole action, stripped, as the move: a model can then move with a single token.
- `terse`: the first observation and each feedback are a few words ("guess 1-8", "higher",
  "invalid"); no turn numbers, format reminders, reveals or per-turn suffix. A game that supports it
  writes `_terse_rules` and answers tersely in `_play` when `self.terse` is set.

Invariant: everything random is drawn from `self.rng`, seeded by `reset(seed)`, so a seed fixes the
episode and concurrent games never share RNG state.
"""

import functools
import random
from typing import Any, ClassVar, Literal

from tidal.envs.answers import MAX_ACTION_CHARS, clip, extract_boxed
from tidal.envs.core import Env, StepResult

__all__ = ["TextGame", "Invalid", "SUCCESS_REWARD", "STEP_REWARD", "FORMAT_ERROR_REWARD", "TERSE_INVALID"]

SUCCESS_REWARD = 1.0
STEP_REWARD = 0.0
FORMAT_ERROR_REWARD = -0.1
"""GEM's format-error penalty, so reward scales match between our games and GEM's."""
TERSE_INVALID = "invalid"
"""The whole feedback to a malformed move with `terse=True`."""


class Invalid(str):
    """Returned by `_parse` to reject a move; the text says what a well-formed move looks like."""


class TextGame(Env):
    """A turn-based puzzle spoken in text; moves are written as `\\boxed{...}` (or bare, `moves="bare"`)."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    """Difficulty name -> constructor parameters (including `max_turns`)."""

    name: ClassVar[str] = ""
    suffix: ClassVar[str] = "Enter your next move."
    """GEM's per-turn reminder, returned as `info["suffix"]`."""

    def __init__(self, difficulty: str = "easy", *, moves: Literal["boxed", "bare"] = "boxed", terse: bool = False,
                 **params: Any):
        if moves not in ("boxed", "bare"):
            raise ValueError(f"{self.name}: moves must be 'boxed' or 'bare', got {moves!r}")
        if terse and type(self)._terse_rules is TextGame._terse_rules:
            raise ValueError(f"{self.name}: terse=True is not supported (the game writes no terse texts)")
        self.moves, self.terse = moves, bool(terse)
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
        """A move's text (`\\boxed{}` content, or the bare action) -> a move; `Invalid(message)` rejects it."""
        raise NotImplementedError

    def _play(self, move: Any) -> tuple[str, float, bool]:
        """Apply a well-formed move: (feedback, reward, ended). Illegal moves are feedback, reward 0."""
        raise NotImplementedError

    def _move(self, text: str) -> str:
        """An action that plays the move written `text`, in this game's `moves` style."""
        return text if self.moves == "bare" else f"\\boxed{{{text}}}"

    def _read_move(self, action: str) -> str | None:
        """The move's text in an action, or None when there is none."""
        if self.moves == "boxed":
            return extract_boxed(action)
        return action.strip() if len(action) <= MAX_ACTION_CHARS else None

    @functools.cached_property
    def _format_hint(self) -> str:
        return self.sample_action(random.Random("format hint"))

    @functools.cached_property
    def instructions(self) -> str:  # type: ignore[override]
        if self.terse:
            return self._terse_rules()
        if self.moves == "bare":
            return self._rules() + (
                f"\nYou have {self.max_turns} turns. Answer with your move alone, for example {self._format_hint}."
            )
        return self._rules() + (
            f"\nYou have {self.max_turns} turns. Think if you like, then write your move inside "
            f"\\boxed{{}}, for example {self._format_hint}; only the last \\boxed{{}} counts."
        )

    def _rules(self) -> str:
        raise NotImplementedError

    def _terse_rules(self) -> str:
        """The whole first observation with `terse=True`: a few words (games that support it write it)."""
        raise NotImplementedError

    @property
    def _info(self) -> dict[str, Any]:
        return {} if self.terse else {"suffix": self.suffix}

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed)
        self.turn = 0
        self.done = False
        self._new_game()
        return self._first_observation, self._info

    @functools.cached_property
    def _first_observation(self) -> str:
        return self.instructions if self.terse else f"{self.instructions}\nEnter your first move."

    def step(self, action: str) -> StepResult:
        if self.done:
            return "The game is over; call reset to play again.", 0.0, True, False, self._info
        self.turn += 1
        content = self._read_move(action) if isinstance(action, str) else None
        move = self._parse(content) if content is not None else None
        if content is None or isinstance(move, Invalid):
            where = "\\boxed{...} " if self.moves == "boxed" else ""
            why = move if isinstance(move, Invalid) else f"no {where}move found in {clip(str(action))!r}"
            obs, reward, ended = f"Turn {self.turn}: invalid move: {why}. Write e.g. {self._format_hint}.", FORMAT_ERROR_REWARD, False
            if self.terse:
                obs = TERSE_INVALID
            info = {**self._info, "invalid": True}
        else:
            obs, reward, ended = self._play(move)
            obs = obs if self.terse else f"Turn {self.turn}: {obs}"
            info = self._info
        truncated = not ended and self.turn >= self.max_turns
        if truncated and not self.terse:
            obs += f"\nYou have used all {self.max_turns} turns. {self._reveal()}"
        self.done = ended or truncated
        return obs, reward, ended, truncated, info

    def _reveal(self) -> str:
        """What the answer was, shown when the turns run out."""
        return ""
