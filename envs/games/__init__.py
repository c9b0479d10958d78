"""The `games` suite: multi-turn text puzzles with `\\boxed{}` moves, difficulty presets, solvers.

Ids take `difficulty=` ("easy", "hard", ...) and any preset parameter as keyword arguments:
`envs.make("games:Mastermind-v0", difficulty="hard", max_turns=12)`.
"""

from envs.games.base import TextGame
from envs.games.guess_the_number import GuessTheNumber
from envs.games.mastermind import Mastermind
from envs.games.minesweeper import Minesweeper
from envs.games.words import Hangman, Wordle
from envs.registry import register

__all__ = ["TextGame", "GuessTheNumber", "Mastermind", "Minesweeper", "Wordle", "Hangman"]

register("games:GuessTheNumber-v0", "envs.games.guess_the_number:GuessTheNumber")
register("games:Mastermind-v0", "envs.games.mastermind:Mastermind")
register("games:Wordle-v0", "envs.games.words:Wordle")
register("games:Hangman-v0", "envs.games.words:Hangman")
register("games:Minesweeper-v0", "envs.games.minesweeper:Minesweeper")
