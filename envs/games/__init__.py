"""The `games` suite: multi-turn text puzzles with `\\boxed{}` (or bare) moves, difficulty presets, solvers.

Ids take `difficulty=` ("easy", "hard", ...) and any preset parameter as keyword arguments:
`envs.make("games:Mastermind-v0", difficulty="hard", max_turns=12)`; every game takes `moves="bare"`
(the action is the move) and GuessTheNumber `terse=True` (few-word observations), see base.py.
"""

from tidal.envs.games.base import TextGame
from tidal.envs.games.guess_the_number import GuessTheNumber
from tidal.envs.games.mastermind import Mastermind
from tidal.envs.games.minesweeper import Minesweeper
from tidal.envs.games.words import Hangman, Wordle
from tidal.envs.registry import register

__all__ = ["TextGame", "GuessTheNumber", "Mastermind", "Minesweeper", "Wordle", "Hangman"]

register("games:GuessTheNumber-v0", "tidal.envs.games.guess_the_number:GuessTheNumber")
register("games:Mastermind-v0", "tidal.envs.games.mastermind:Mastermind")
register("games:Wordle-v0", "tidal.envs.games.words:Wordle")
register("games:Hangman-v0", "tidal.envs.games.words:Hangman")
register("games:Minesweeper-v0", "tidal.envs.games.minesweeper:Minesweeper")
