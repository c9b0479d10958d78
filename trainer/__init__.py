"""The off-policy trainer: advantages, losses, packing and the learner (one training step), plus the
daemon around them. Imports protocol, torch and transformers; never engine or envs (docs/architecture.md).

Submodules are imported where used so `import trainer` stays light; the learner's public surface:

    from tidal.trainer.learner import Learner, LearnerConfig
"""

__all__: list[str] = []
