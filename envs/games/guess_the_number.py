r"""Guess the number between lo and hi; each guess is answered "higher" or "lower" (GEM's game).

With `terse=True` the game speaks in single words: the first observation is "guess LOW-HIGH", each
guess is answered "higher", "lower" or "correct" (a guess outside the range too: the answer is still
true), a malformed move "invalid". With `moves="bare"` as well, a tokenizer whose words are the digits
and these few words lets a model play one token per move.
"""

import random
import re

from tidal.envs.core import Solver
from tidal.envs.games.base import STEP_REWARD, SUCCESS_REWARD, Invalid, TextGame

__all__ = ["GuessTheNumber"]


class GuessTheNumber(TextGame):
    r"""Moves are `\boxed{N}` (or `N`). Binary search solves it within ceil(log2(hi - lo + 2)) turns."""

    name = "GuessTheNumber"
    suffix = "Enter your next guess."
    PRESETS = {
        "easy": {"low": 1, "high": 10, "max_turns": 4},
        "hard": {"low": 1, "high": 50, "max_turns": 7},
        "extreme": {"low": 1, "high": 1000, "max_turns": 12},
    }

    def _configure(self, low: int, high: int) -> None:
        if high <= low:
            raise ValueError(f"GuessTheNumber: high must exceed low, got low={low} high={high}")
        self.low, self.high = low, high

    def _rules(self) -> str:
        return (
            f"You are playing Guess The Number. Guess the secret integer between {self.low} and "
            f"{self.high} (inclusive). After each guess you are told whether the number is higher or lower."
        )

    def _terse_rules(self) -> str:
        return f"guess {self.low}-{self.high}"

    def _new_game(self) -> None:
        self.target = self.rng.randint(self.low, self.high)
        self.guessed: set[int] = set()

    def _parse(self, move: str) -> int | Invalid:
        if not re.fullmatch(r"[+-]?\d{1,18}", move.strip()):
            return Invalid(f"{move[:40]!r} is not an integer")
        return int(move)

    def _play(self, guess: int) -> tuple[str, float, bool]:
        if self.terse:
            if guess == self.target:
                return "correct", SUCCESS_REWARD, True
            return ("higher" if self.target > guess else "lower"), STEP_REWARD, False
        if not self.low <= guess <= self.high:
            return f"{guess} is outside the range {self.low}-{self.high}.", STEP_REWARD, False
        if guess == self.target:
            return f"Correct! The number was {guess}.", SUCCESS_REWARD, True
        repeat = " (you guessed it before)" if guess in self.guessed else ""
        self.guessed.add(guess)
        hint = "higher" if self.target > guess else "lower"
        return f"you guessed {guess}{repeat}; the number is {hint} than {guess}.", STEP_REWARD, False

    def _reveal(self) -> str:
        return f"The number was {self.target}."

    def sample_action(self, rng: random.Random) -> str:
        return self._move(str(rng.randint(self.low, self.high)))

    def solver(self) -> Solver:
        lo, hi = self.low, self.high
        last = None

        def policy(obs: str) -> str:
            nonlocal lo, hi, last
            if last is not None and (f"higher than {last}" in obs or obs == "higher"):
                lo = last + 1
            elif last is not None and (f"lower than {last}" in obs or obs == "lower"):
                hi = last - 1
            last = (lo + hi) // 2
            return self._move(str(last)) if self.moves == "bare" else f"My guess is \\boxed{{{last}}}"

        return policy
