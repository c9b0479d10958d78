"""Stands for a missing matplotlib in tests of `tidal run` (PYTHONPATH puts it first): importing it fails."""

raise ImportError("No module named 'matplotlib' (the tests' stand-in for a machine without the train extra)")
