"""Envs for tests/envs/test_process.py, imported by the env worker process by entry point."""

import os
import time

from tidal.envs.core import Env


class Misbehaving(Env):
    """'hang' sleeps far past any timeout, 'crash' kills the process, 'raise' raises, 'print' prints,
    'leak' keeps 256 MiB of address space (never touched) for good."""

    instructions = "Misbehave on request."

    def reset(self, seed=None):
        super().reset(seed)
        return f"ready {self.rng.randint(0, 10**6)}", {"pid": os.getpid()}

    def step(self, action):
        if action == "hang":
            time.sleep(60)
        elif action == "crash":
            os._exit(3)
        elif action == "raise":
            raise RuntimeError("deliberate failure in step")
        elif action == "leak":
            self.leaked = [*getattr(self, "leaked", []), bytes(256 << 20)]
        elif action == "print":
            print("noise on stdout that must not corrupt a frame", flush=True)
        return f"did {action}", 1.0, action == "stop", False, {"pid": os.getpid()}
