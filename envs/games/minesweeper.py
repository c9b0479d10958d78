r"""Minesweeper on a small board: reveal every safe cell; a mine ends the game (GEM's move format)."""

import random

from tidal.envs.core import Solver
from tidal.envs.games.base import STEP_REWARD, SUCCESS_REWARD, Invalid, TextGame

__all__ = ["Minesweeper"]


class Minesweeper(TextGame):
    r"""Moves are `\boxed{reveal R C}` or `\boxed{flag R C}`, 0-indexed rows and columns.

    Mines are placed after the first reveal, away from it, so the first move is always safe (and
    the layout still follows from the seed and the first move alone).
    """

    name = "Minesweeper"
    suffix = "Enter your next move."
    PRESETS = {
        "easy": {"rows": 5, "cols": 5, "mines": 5, "max_turns": 25},
        "hard": {"rows": 8, "cols": 8, "mines": 12, "max_turns": 64},
    }

    def _configure(self, rows: int, cols: int, mines: int) -> None:
        if rows < 3 or cols < 3 or not 1 <= mines <= rows * cols - 9:
            raise ValueError(f"Minesweeper: need rows, cols >= 3 and 1 <= mines <= rows*cols-9, got {rows}x{cols}, {mines}")
        self.rows, self.cols, self.mines = rows, cols, mines

    def _rules(self) -> str:
        return (
            f"You are playing Minesweeper on a {self.rows}x{self.cols} board with {self.mines} hidden mines. "
            "Reveal every cell that has no mine. A revealed number counts the mines among its 8 neighbours. "
            "Move with 'reveal R C' or 'flag R C' (rows and columns from 0). On the board, '.' is hidden, "
            "'F' is a flag, '*' a mine. Revealing a mine ends the game."
        )

    def _new_game(self) -> None:
        self.mine_cells: set[tuple[int, int]] = set()
        self.revealed: set[tuple[int, int]] = set()
        self.flags: set[tuple[int, int]] = set()

    def _neighbours(self, r: int, c: int):
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if (dr or dc) and 0 <= r + dr < self.rows and 0 <= c + dc < self.cols:
                    yield r + dr, c + dc

    def _count(self, r: int, c: int) -> int:
        return self.counts[r * self.cols + c]

    def _place_mines(self, r: int, c: int) -> None:
        keep_clear = {(r, c), *self._neighbours(r, c)}
        cells = [(i, j) for i in range(self.rows) for j in range(self.cols) if (i, j) not in keep_clear]
        self.mine_cells = set(self.rng.sample(cells, self.mines))
        self.counts = [
            sum(n in self.mine_cells for n in self._neighbours(i, j)) for i in range(self.rows) for j in range(self.cols)
        ]

    def _flood(self, r: int, c: int) -> None:
        stack = [(r, c)]
        while stack:
            cell = stack.pop()
            if cell in self.revealed:
                continue
            self.revealed.add(cell)
            self.flags.discard(cell)
            if self._count(*cell) == 0:
                stack.extend(n for n in self._neighbours(*cell) if n not in self.revealed)

    def board(self, show_mines: bool = False) -> str:
        head = "   " + " ".join(f"{c:2}" for c in range(self.cols))
        lines = [head]
        for r in range(self.rows):
            cells = []
            for c in range(self.cols):
                if (r, c) in self.revealed:
                    cells.append(str(self._count(r, c)))
                elif show_mines and (r, c) in self.mine_cells:
                    cells.append("*")
                else:
                    cells.append("F" if (r, c) in self.flags else ".")
            lines.append(f"{r:2} " + " ".join(f"{x:>2}" for x in cells))
        return "\n".join(lines)

    def _parse(self, move: str) -> tuple[str, int, int] | Invalid:
        parts = move.replace(",", " ").split()
        if len(parts) != 3 or parts[0].lower() not in ("reveal", "flag") or not all(p.isdigit() for p in parts[1:]):
            return Invalid(f"expected 'reveal R C' or 'flag R C', got {move[:40]!r}")
        return parts[0].lower(), int(parts[1]), int(parts[2])

    def _play(self, move: tuple[str, int, int]) -> tuple[str, float, bool]:
        kind, r, c = move
        if not (0 <= r < self.rows and 0 <= c < self.cols):
            return f"({r}, {c}) is off the {self.rows}x{self.cols} board.\n{self.board()}", STEP_REWARD, False
        if (r, c) in self.revealed:
            return f"({r}, {c}) is already revealed.\n{self.board()}", STEP_REWARD, False
        if kind == "flag":
            self.flags ^= {(r, c)}
            what = "placed" if (r, c) in self.flags else "removed"
            return f"flag {what} at ({r}, {c}).\n{self.board()}", STEP_REWARD, False
        if not self.mine_cells:
            self._place_mines(r, c)
        if (r, c) in self.mine_cells:
            return f"({r}, {c}) was a mine. Game over.\n{self.board(show_mines=True)}", STEP_REWARD, True
        self._flood(r, c)
        if len(self.revealed) == self.rows * self.cols - self.mines:
            return f"revealed ({r}, {c}). All safe cells are revealed: you win!\n{self.board()}", SUCCESS_REWARD, True
        return f"revealed ({r}, {c}).\n{self.board()}", STEP_REWARD, False

    def _reveal(self) -> str:
        return f"The mines were:\n{self.board(show_mines=True)}"

    def sample_action(self, rng: random.Random) -> str:
        kind = "reveal" if rng.random() < 0.9 else "flag"
        return self._move(f"{kind} {rng.randrange(self.rows)} {rng.randrange(self.cols)}")

    def solver(self) -> Solver:
        """A privileged solver: it reads the mine layout from the env (for tests, not for learning)."""

        def policy(obs: str) -> str:
            if not self.mine_cells:
                return self._move(f"reveal {self.rows // 2} {self.cols // 2}")
            r, c = next(
                (i, j)
                for i in range(self.rows)
                for j in range(self.cols)
                if (i, j) not in self.mine_cells and (i, j) not in self.revealed
            )
            return self._move(f"reveal {r} {c}")

        return policy
