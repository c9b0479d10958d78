"""The worked extension (tests/examples/custom_env.py) runs and shows what it claims."""

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_env.py"


def test_custom_env_example_runs():
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120,
                         cwd=EXAMPLE.parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "check_env: ok" in out.stdout
    assert "solver rewards: [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]" in out.stdout
    assert "random finish reasons:" in out.stdout and "truncated" in out.stdout
