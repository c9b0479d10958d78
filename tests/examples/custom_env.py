"""A custom environment for tidal, end to end: write it, register it, check it, wrap it, run it.

    python tests/examples/custom_env.py

The env is a text maze: the agent walks a small grid to the exit with `\\boxed{N}` (N, S, E, W).
Run by tests/envs/test_custom_env_example.py, so it stays true to the API.
"""

import asyncio
import random

from tidal.envs.wrappers import StepTimeout, TurnLimit

from tidal import envs

# --- 1. The env: reset(seed) -> (obs, info); step(action) -> (obs, reward, terminated, truncated, info)
MOVES = {"N": (-1, 0), "S": (1, 0), "E": (0, 1), "W": (0, -1)}


class Maze(envs.Env):
    """Walk from S to X on a `size` x `size` grid with walls '#'. Cheap, so `blocking` stays False."""

    instructions = "Find the exit X. Move with \\boxed{N}, \\boxed{S}, \\boxed{E} or \\boxed{W}."

    def __init__(self, size: int = 5):
        self.size = size

    def reset(self, seed=None):
        super().reset(seed)  # seeds self.rng, this env's own RNG: the seed fixes the maze
        cells = [(r, c) for r in range(self.size) for c in range(self.size)]
        self.pos, self.exit = (0, 0), (self.size - 1, self.size - 1)
        self.walls = {cell for cell in self.rng.sample(cells, self.size) if cell not in (self.pos, self.exit)}
        while not self._path():  # redraw until the exit is reachable
            self.walls = set(self.rng.sample(sorted(self.walls), len(self.walls) // 2))
        return self.instructions + "\n" + self._board(), {}

    def step(self, action):
        move = (envs.extract_boxed(action) or "").strip().upper()
        if move not in MOVES:  # a bad action is feedback and a penalty, never an exception
            return f"'{move[:20]}' is not a move; use N, S, E or W.\n{self._board()}", -0.1, False, False, {}
        r, c = self.pos[0] + MOVES[move][0], self.pos[1] + MOVES[move][1]
        if 0 <= r < self.size and 0 <= c < self.size and (r, c) not in self.walls:
            self.pos = (r, c)
        solved = self.pos == self.exit
        return ("You found the exit!\n" if solved else "") + self._board(), float(solved), solved, False, {}

    def _board(self):
        def cell(rc):
            return "S" if rc == self.pos else "X" if rc == self.exit else "#" if rc in self.walls else "."

        return "\n".join("".join(cell((r, c)) for c in range(self.size)) for r in range(self.size))

    def _path(self):
        """Breadth-first search: the moves from the current position to the exit, or []."""
        seen, frontier = {self.pos: []}, [self.pos]
        while frontier:
            nxt = []
            for r, c in frontier:
                for name, (dr, dc) in MOVES.items():
                    rc = (r + dr, c + dc)
                    if 0 <= rc[0] < self.size and 0 <= rc[1] < self.size and rc not in self.walls and rc not in seen:
                        seen[rc] = seen[(r, c)] + [name]
                        nxt.append(rc)
            frontier = nxt
        return seen.get(self.exit, [])

    def solver(self):
        return lambda obs: f"\\boxed{{{self._path()[0]}}}"

    def sample_action(self, rng):
        return f"\\boxed{{{rng.choice('NSEW')}}}"


# --- 2. Register it under an id (`suite:Name-vN`); a package would use the `tidal.envs` entry point.
envs.register("examples:Maze-v0", entry_point=Maze, size=5)


async def main() -> None:
    # --- 3. Check it against the API's promises (types, determinism, bad actions, step speed).
    warnings = await envs.acheck_env(envs.make("examples:Maze-v0"))
    print("check_env:", "ok" if not warnings else warnings)

    # --- 4. Wrap it as the engine would: a turn limit and a per-step timeout.
    def make():
        return StepTimeout(TurnLimit(envs.make("examples:Maze-v0", size=6), max_turns=30), timeout_s=5.0)

    # --- 5. Run episodes concurrently: the solver, and a random policy.
    mazes = [make() for _ in range(8)]
    solved = await asyncio.gather(*(envs.run_episode(env, env.solver(), seed=s) for s, env in enumerate(mazes)))
    rng = random.Random(0)

    def wander(obs: str) -> str:
        return f"\\boxed{{{rng.choice('NSEW')}}}"

    wandering = await asyncio.gather(*(envs.run_episode(env, wander, seed=s) for s, env in enumerate(mazes)))
    print("solver rewards:", [ep.total_reward for ep in solved])
    print("random finish reasons:", sorted({ep.finish_reason for ep in wandering}))


if __name__ == "__main__":
    asyncio.run(main())
