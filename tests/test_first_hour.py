"""A fresh clone's first steps: a license it may be used under, and a Makefile that finds a Python."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_project_is_apache_2_licensed():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")


def make_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "--no-print-directory", "-C", str(ROOT), "python", *args],
                          capture_output=True, text=True, timeout=60)


@needs_make
def test_make_finds_a_python_of_at_least_3_11():
    out = make_python()
    assert out.returncode == 0, out.stderr
    chosen = out.stdout.split("make: using ", 1)[1].split(" (", 1)[0]
    version = subprocess.run([chosen, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                             capture_output=True, text=True, check=True).stdout
    assert version.strip() == "True"
    assert make_python(f"PY={sys.executable}").stdout.startswith(f"make: using {sys.executable} (Python 3.")


@needs_make
def test_make_says_which_python_is_missing():
    out = make_python("PYTHONS=no-such-python3.99 no-such-python3")
    assert out.returncode == 2
    assert "no Python 3.11 or newer found (tried no-such-python3.99 no-such-python3)" in out.stderr
    assert "make PY=/path/to/python3.11" in out.stderr
    out = make_python("PY=false")  # a command that runs but is no Python 3.11
    assert out.returncode == 2 and "PY=false is not a Python 3.11 or newer" in out.stderr
