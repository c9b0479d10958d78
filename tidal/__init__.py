"""tidal: an asynchronous rollout engine with a decoupled off-policy trainer for RL of LLM agents.

Everything installs under this one namespace: `tidal.engine`, `tidal.envs`, `tidal.protocol`,
`tidal.trainer` and `tidal.bench` (the repository keeps them as top-level folders; pyproject.toml
maps them here), so tidal never shadows another distribution's `envs` or `protocol`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tidal")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
