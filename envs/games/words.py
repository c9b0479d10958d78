r"""Word games over the shipped word list (data/words.txt): Wordle and Hangman.

The list (8.7k English words of 3-5 letters, from reasoning-gym's data, Apache-2.0) ships with
the package, so these games run offline, unlike GEM's, which download NLTK's corpus at reset.
"""

import functools
import random
import re
from collections import Counter
from pathlib import Path

from tidal.envs.core import Solver
from tidal.envs.games.base import STEP_REWARD, SUCCESS_REWARD, Invalid, TextGame

__all__ = ["Wordle", "Hangman", "words", "wordle_feedback"]

WORDS_FILE = Path(__file__).with_name("data") / "words.txt"


@functools.cache
def words(length: int) -> tuple[str, ...]:
    """The shipped words of `length` letters, lowercase, sorted."""
    lines = WORDS_FILE.read_text().splitlines()
    found = tuple(w for w in lines if len(w) == length and not w.startswith("#"))
    if not found:
        raise ValueError(f"no shipped words of length {length}; lengths 3 to 5 exist")
    return found


def wordle_feedback(secret: str, guess: str) -> str:
    """Per letter: G right place, Y elsewhere in the word (counting repeats), X absent."""
    marks = ["X"] * len(guess)
    left = Counter(s for s, g in zip(secret, guess, strict=True) if s != g)
    for i, (s, g) in enumerate(zip(secret, guess, strict=True)):
        if s == g:
            marks[i] = "G"
        elif left[g] > 0:
            marks[i] = "Y"
            left[g] -= 1
    return "".join(marks)


_WORDLE_FEEDBACK = re.compile(r"guessed ([A-Z]+): ([GYX]+)")


class Wordle(TextGame):
    r"""Moves are `\boxed{WORD}`; feedback marks each letter G (green), Y (yellow) or X (grey)."""

    name = "Wordle"
    suffix = "Enter your next guess."
    PRESETS = {
        "easy": {"word_length": 3, "only_real_words": True, "max_turns": 15},
        "hard": {"word_length": 5, "only_real_words": True, "max_turns": 10},
    }

    def _configure(self, word_length: int, only_real_words: bool) -> None:
        self.word_length, self.only_real_words = word_length, only_real_words
        self.vocab = words(word_length)
        self._vocab_set = frozenset(self.vocab)

    def _rules(self) -> str:
        real = " It must be an English word." if self.only_real_words else ""
        return (
            f"You are playing Wordle. Find the secret {self.word_length}-letter word. Each guess is a "
            f"{self.word_length}-letter word.{real} Feedback gives one mark per letter: G = right letter "
            "in the right place, Y = in the word but elsewhere, X = not in the word."
        )

    def _new_game(self) -> None:
        self.secret = self.rng.choice(self.vocab)

    def _parse(self, move: str) -> str | Invalid:
        word = move.strip().lower()
        if not re.fullmatch(r"[a-z]+", word) or len(word) != self.word_length:
            return Invalid(f"expected one {self.word_length}-letter word, got {move[:40]!r}")
        return word

    def _play(self, word: str) -> tuple[str, float, bool]:
        if self.only_real_words and word not in self._vocab_set:
            return f"{word.upper()} is not in the word list; this guess does not count against the word.", STEP_REWARD, False
        marks = wordle_feedback(self.secret, word)
        if word == self.secret:
            return f"guessed {word.upper()}: {marks}. You found the word!", SUCCESS_REWARD, True
        return f"guessed {word.upper()}: {marks}.", STEP_REWARD, False

    def _reveal(self) -> str:
        return f"The word was {self.secret.upper()}."

    def sample_action(self, rng: random.Random) -> str:
        return self._move(rng.choice(self.vocab).upper())

    def solver(self) -> Solver:
        candidates = list(self.vocab)

        def policy(obs: str) -> str:
            nonlocal candidates
            for guess, marks in _WORDLE_FEEDBACK.findall(obs):
                g = guess.lower()
                candidates = [c for c in candidates if wordle_feedback(c, g) == marks]
            return self._move(_most_informative(candidates).upper())

        return policy


def _most_informative(candidates: list[str]) -> str:
    """The candidate whose letters are most common among the candidates (a cheap entropy proxy)."""
    freq = Counter(ch for w in candidates for ch in set(w))
    return max(candidates, key=lambda w: (sum(freq[ch] for ch in set(w)), w))


class Hangman(TextGame):
    r"""Moves are `\boxed{E}` (a letter) or `\boxed{WORD}` (the whole word); wrong guesses cost lives.

    Short words are the hard ones (`_A_` fits hundreds of words), so both presets use 5 letters;
    "hard" has fewer lives.
    """

    name = "Hangman"
    suffix = "Enter your next guess."
    PRESETS = {
        "easy": {"word_length": 5, "lives": 10, "max_turns": 26},
        "hard": {"word_length": 5, "lives": 7, "max_turns": 20},
    }

    def _configure(self, word_length: int, lives: int) -> None:
        if lives < 1:
            raise ValueError(f"Hangman: lives must be >= 1, got {lives}")
        self.word_length, self.lives = word_length, lives
        self.vocab = words(word_length)

    def _rules(self) -> str:
        return (
            f"You are playing Hangman. Find the secret {self.word_length}-letter English word. Guess one "
            f"letter at a time, or the whole word. Each wrong guess costs a life; you have {self.lives}."
        )

    def _new_game(self) -> None:
        self.secret = self.rng.choice(self.vocab)
        self.guessed: set[str] = set()
        self.lives_left = self.lives

    def _pattern(self) -> str:
        return " ".join(c.upper() if c in self.guessed else "_" for c in self.secret)

    def _parse(self, move: str) -> str | Invalid:
        guess = move.strip().lower()
        if not re.fullmatch(r"[a-z]+", guess) or len(guess) not in (1, self.word_length):
            return Invalid(f"expected one letter or a {self.word_length}-letter word, got {move[:40]!r}")
        return guess

    def _play(self, guess: str) -> tuple[str, float, bool]:
        if guess == self.secret or (len(guess) == 1 and set(self.secret) <= self.guessed | {guess}):
            self.guessed |= set(self.secret)
            return f"word: {self._pattern()}. You found the word!", SUCCESS_REWARD, True
        if len(guess) == 1 and guess in self.guessed:
            return f"you already guessed {guess.upper()}. word: {self._pattern()}", STEP_REWARD, False
        if len(guess) == 1:
            self.guessed.add(guess)
        if len(guess) > 1 or guess not in self.secret:
            self.lives_left -= 1
            if self.lives_left == 0:
                return f"{guess.upper()} is wrong and you have no lives left. {self._reveal()}", STEP_REWARD, True
            return f"{guess.upper()} is wrong. word: {self._pattern()} lives: {self.lives_left}", STEP_REWARD, False
        return f"{guess.upper()} is in the word. word: {self._pattern()} lives: {self.lives_left}", STEP_REWARD, False

    def _reveal(self) -> str:
        return f"The word was {self.secret.upper()}."

    def sample_action(self, rng: random.Random) -> str:
        return self._move(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))

    def solver(self) -> Solver:
        candidates = list(self.vocab)
        tried: set[str] = set()

        def policy(obs: str) -> str:
            nonlocal candidates
            m = re.findall(r"word: ([A-Z_ ]+?)(?: lives|\.|$)", obs)
            if m:
                pattern = m[-1].replace(" ", "").lower()
                wrong = {c for c in tried if c not in pattern}
                candidates = [
                    w for w in candidates
                    if all(p == "_" and c not in tried or p == c for p, c in zip(pattern, w, strict=True))
                    and not wrong & set(w)
                ]
            elif tried:
                candidates = [w for w in candidates if not tried & set(w)]
            if len(candidates) == 1:
                return self._move(candidates[0].upper())
            freq = Counter(ch for w in candidates for ch in set(w) if ch not in tried)
            letter = max(freq, key=lambda ch: (freq[ch], ch))
            tried.add(letter)
            return self._move(letter.upper())

        return policy
