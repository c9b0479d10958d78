"""tidal installs under one namespace, `tidal.*`, and never shadows another distribution.

The repository keeps `engine/`, `envs/`, `protocol/`, `trainer/` and `bench/` at its top; pyproject.toml
maps them to `tidal.engine` ... `tidal.bench`. These tests check that nothing imports the bare names,
that the wheel holds exactly the tree under `tidal/`, and that the wheel installs beside PyPI's own
`envs` package (environment-variable parsing) with both importable.
"""

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"tidal": "tidal", "engine": "tidal.engine", "trainer": "tidal.trainer", "envs": "tidal.envs",
            "protocol": "tidal.protocol", "bench": "tidal.bench"}
BARE = set(PACKAGES) - {"tidal"}
SKIP_DIRS = {".git", ".venv", "__pycache__", "build", "runs", ".pytest_cache", ".ruff_cache", ".hypothesis"}


def _python_files():
    for path in ROOT.rglob("*.py"):
        if not SKIP_DIRS.intersection(path.relative_to(ROOT).parts):
            yield path


def _bare_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for name in names
                  if name.split(".")[0] in BARE]
    return found


def test_nothing_imports_a_bare_top_level_name():
    bad = [hit for path in _python_files() for hit in _bare_imports(path)]
    assert not bad, "import through tidal.* instead:\n" + "\n".join(bad)


def test_entry_points_and_console_script_use_tidal_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    targets = [project["scripts"]["tidal"], *project["entry-points"]["tidal.backends"].values()]
    assert all(t.startswith("tidal.") for t in targets), targets


def test_every_package_folder_is_listed_in_pyproject():
    """package-dir needs the packages spelled out: a new sub-package must be added there."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {v: k for k, v in PACKAGES.items()}
    on_disk = {".".join([PACKAGES[init.relative_to(ROOT).parts[0]], *init.relative_to(ROOT).parts[1:-1]])
               for top in PACKAGES for init in (ROOT / top).rglob("__init__.py")
               if "__pycache__" not in init.parts}
    assert set(setuptools["packages"]) == on_disk


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of the tree (the checkout stays clean)."""
    src = tmp_path_factory.mktemp("src") / "tidal"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*SKIP_DIRS, "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (whl,) = out.glob("tidal-*.whl")
    return whl


@pytest.mark.slow
def test_the_wheel_holds_only_tidal_and_the_whole_tree(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"tidal"}
    expected = {"/".join([*PACKAGES[p.relative_to(ROOT).parts[0]].split("."), *p.relative_to(ROOT).parts[1:]])
                for top in PACKAGES for p in (ROOT / top).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
                and p.relative_to(ROOT).parts[:2] != ("bench", "results")}  # `tidal bench all`'s output, not code
    assert expected <= set(names), sorted(expected - set(names))[:20]
    assert "tidal/envs/games/data/words.txt" in names  # package data comes along


@pytest.mark.slow
def test_the_wheel_installs_beside_pypis_envs_package(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, tidal = venv / "bin" / "python", venv / "bin" / "tidal"
    done = subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel), "envs==1.4"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = (
        "import envs, tidal, tidal.envs, tidal.protocol.messages\n"
        "from envs import env\n"  # PyPI's envs: environment-variable parsing
        "assert callable(env) and not hasattr(envs, 'make'), envs.__file__\n"
        "assert 'games:GuessTheNumber-v0' in tidal.envs.list()\n"
        "print(envs.__file__, tidal.envs.__file__, tidal.__version__)\n"
    )
    done = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    pypi_envs, ours, version = done.stdout.split()
    assert Path(pypi_envs).parent.name == "envs" and Path(ours).parts[-3:] == ("tidal", "envs", "__init__.py")
    assert "site-packages" in pypi_envs and "site-packages" in ours
    done = subprocess.run([str(tidal), "--version"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"tidal {version}" != "tidal 0+unknown", done
