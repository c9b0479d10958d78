r"""Mastermind: find a secret code of digits; each guess is scored in exact and misplaced digits."""

import itertools
import random
import re

from tidal.envs.core import Solver
from tidal.envs.games.base import STEP_REWARD, SUCCESS_REWARD, Invalid, TextGame

__all__ = ["Mastermind", "score"]

_FEEDBACK = re.compile(r"guessed ([\d ]+): (\d+) exact, (\d+) misplaced")


def score(secret: tuple[int, ...], guess: tuple[int, ...]) -> tuple[int, int]:
    """(exact, misplaced): digits right in place, and further digits right but elsewhere."""
    exact = sum(s == g for s, g in zip(secret, guess, strict=True))
    common = sum(min(secret.count(d), guess.count(d)) for d in set(guess))
    return exact, common - exact


class Mastermind(TextGame):
    r"""Moves are `\boxed{1 2 3 4}`. The solver guesses the first code consistent with all feedback."""

    name = "Mastermind"
    suffix = "Enter your next guess."
    PRESETS = {
        "easy": {"code_length": 2, "num_digits": 6, "duplicates": False, "max_turns": 10},
        "hard": {"code_length": 4, "num_digits": 8, "duplicates": False, "max_turns": 30},
        "classic": {"code_length": 4, "num_digits": 6, "duplicates": True, "max_turns": 10},
    }

    def _configure(self, code_length: int, num_digits: int, duplicates: bool) -> None:
        if not 1 <= num_digits <= 9 or code_length < 1 or (not duplicates and code_length > num_digits):
            raise ValueError(
                f"Mastermind: need 1 <= num_digits <= 9 and code_length >= 1 (<= num_digits without duplicates), "
                f"got code_length={code_length} num_digits={num_digits} duplicates={duplicates}"
            )
        self.code_length, self.num_digits, self.duplicates = code_length, num_digits, duplicates

    def _rules(self) -> str:
        dup = "may repeat" if self.duplicates else "are all different"
        return (
            f"You are playing Mastermind. Find the secret code of {self.code_length} digits, each from 1 "
            f"to {self.num_digits}; the digits {dup}. After each guess you are told how many digits are "
            "exact (right digit, right position) and how many are misplaced (in the code, other position)."
        )

    def _new_game(self) -> None:
        digits = range(1, self.num_digits + 1)
        if self.duplicates:
            self.secret = tuple(self.rng.choice(digits) for _ in range(self.code_length))
        else:
            self.secret = tuple(self.rng.sample(digits, self.code_length))

    def _parse(self, move: str) -> tuple[int, ...] | Invalid:
        tokens = re.split(r"[\s,]+", move.strip())
        if len(tokens) == 1 and tokens[0].isdigit():
            tokens = list(tokens[0])
        if len(tokens) != self.code_length or not all(t.isdigit() and len(t) == 1 for t in tokens):
            return Invalid(f"expected {self.code_length} digits separated by spaces, got {move[:40]!r}")
        return tuple(int(t) for t in tokens)

    def _play(self, guess: tuple[int, ...]) -> tuple[str, float, bool]:
        if not all(1 <= d <= self.num_digits for d in guess):
            return f"every digit must be between 1 and {self.num_digits}.", STEP_REWARD, False
        exact, misplaced = score(self.secret, guess)
        text = " ".join(map(str, guess))
        if exact == self.code_length:
            return f"guessed {text}: {exact} exact, 0 misplaced. You cracked the code!", SUCCESS_REWARD, True
        return f"guessed {text}: {exact} exact, {misplaced} misplaced.", STEP_REWARD, False

    def _reveal(self) -> str:
        return f"The code was {' '.join(map(str, self.secret))}."

    def _codes(self):
        digits = range(1, self.num_digits + 1)
        if self.duplicates:
            return itertools.product(digits, repeat=self.code_length)
        return itertools.permutations(digits, self.code_length)

    def sample_action(self, rng: random.Random) -> str:
        return self._move(" ".join(str(rng.randint(1, self.num_digits)) for _ in range(self.code_length)))

    def solver(self) -> Solver:
        candidates = list(self._codes())

        def policy(obs: str) -> str:
            nonlocal candidates
            m = _FEEDBACK.search(obs)
            if m is not None:
                guess = tuple(int(d) for d in m.group(1).split())
                fb = (int(m.group(2)), int(m.group(3)))
                candidates = [c for c in candidates if score(c, guess) == fb]
            return self._move(" ".join(map(str, candidates[0])))

        return policy
