"""A stand-in for the sglang package in tests of `tidal run` (no GPU here): importable, nothing else."""
