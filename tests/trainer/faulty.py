"""`python -m tests.trainer.faulty CONFIG`: the trainer daemon with one scripted fault (docs/contributing.md,
"Faults are scripted"), since there is no GPU here to run out of memory.

The model's forward raises the `torch.OutOfMemoryError` a CUDA allocation raises whenever its input
holds at least POISON_RUN copies of the token POISON (random trajectories over the tiny model's 263
ids practically never do), so a test fails exactly the step whose batch holds a poisoned trajectory.
With `grad_only` the hook fires only in passes that record a graph (the update, not the no-grad pass).
Under torchrun, ATTEMPTS_ENV makes the fault transient: gone once torchrun restarts the group.
"""

import os
import sys

import torch

POISON = 13
POISON_RUN = 16
ATTEMPTS_ENV = "TIDAL_FAULTY_ATTEMPTS"
"""Set to n: only the first n attempts of a torchrun job (its TORCHELASTIC_RESTART_COUNT) are poisoned."""


def poison(model: torch.nn.Module, *, grad_only: bool = False) -> None:
    """Make `model`'s forward raise on poisoned input."""
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if (torch.is_grad_enabled() or not grad_only) and int((ids == POISON).sum()) >= POISON_RUN:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (scripted: poisoned batch)")

    model.register_forward_pre_hook(hook, with_kwargs=True)


def main() -> int:
    import tidal.trainer.daemon as daemon

    build = daemon._build_learner

    def build_poisoned(cfg, world):
        learner = build(cfg, world)
        poison(learner.base_model)
        return learner

    attempts = os.environ.get(ATTEMPTS_ENV)
    if attempts is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) < int(attempts):
        daemon._build_learner = build_poisoned
    return daemon.main()


if __name__ == "__main__":
    sys.exit(main())
