"""The project's error hierarchy: one base, and each subclass also inherits the builtin it refines.

Every boundary (wire decode, config load, HTTP response parsing) raises one of these with a message
that says what was expected, what came, and where (key, trajectory id, server URL).
"""

__all__ = ["TidalError", "ProtocolError", "ConfigError"]


class TidalError(Exception):
    """Base of every error tidal raises on purpose."""


class ProtocolError(TidalError, ValueError):
    """A frame or message that does not meet its schema: garbage, truncated, wrong version or range."""


class ConfigError(TidalError, ValueError):
    """A configuration that names an unknown key, has a wrong type or an out-of-range value."""
