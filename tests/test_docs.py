"""The repository stands alone: every reference to documentation resolves inside it.

Code, tests and the README cite docs/ pages by path ("docs/architecture.md invariant 4", "docs/sglang.md
§1.6", "docs/protocol.md, 'Engine <-> trainer messages'"). These tests fail when a cited page, SGLang
section, invariant number or section name does not exist, and when any file points outside the
repository (the design notes it once cited were never part of it).
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

OUTSIDE = re.compile(r"\.\./shared|/work/shared|DESIGN\.md|STYLE\.md|protocols/")
"""References to files that are not in the repository (the notes the project started from)."""
DOC_PATH = re.compile(r"\bdocs/([A-Za-z0-9_-]+)\.md\b")
SGLANG_SECTION = re.compile(r"§(\d+(?:\.\d+)?)")
SGLANG_HEADING = re.compile(r"^#+ §(\d+(?:\.\d+)?) ", re.MULTILINE)
INVARIANTS = re.compile(r"docs/architecture\.md(?:'s)? invariants? (\d+(?:(?:, | and |-)\d+)*)")
NAMED_SECTION = re.compile(r"docs/([A-Za-z0-9_-]+)\.md,\s*(?:'([^']+)'|\"([^\"]+)\")")
"""A section cited by name, quoted: `docs/X.md, 'Name'` or `docs/X.md, "Name"`."""


def _files() -> dict[str, str]:
    """Every tracked file (this one aside), as text."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the file list comes from git")
    texts = {}
    for name in filter(None, out.decode().split("\0")):
        path = ROOT / name
        if path.is_file() and name != THIS:
            texts[name] = path.read_bytes().decode("utf-8", errors="replace")
    return texts


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    return _files()


def _where(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def test_nothing_points_outside_the_repository(files):
    found = [f"{name}:{_where(text, m.start())}: {m.group(0)}"
             for name, text in files.items() for m in OUTSIDE.finditer(text)]
    assert not found, "references to files outside the repository (cite docs/ instead):\n" + "\n".join(found)


def test_every_docs_page_cited_exists(files):
    assert DOCS.is_dir()
    missing = [f"{name}:{_where(text, m.start())}: {m.group(0)}"
               for name, text in files.items() for m in DOC_PATH.finditer(text)
               if not (DOCS / f"{m.group(1)}.md").is_file()]
    assert not missing, "cited docs pages that do not exist:\n" + "\n".join(missing)


def test_every_sglang_section_cited_is_a_heading_of_docs_sglang(files):
    """Files that cite docs/sglang.md number its sections (§1.6, §3.2, §0 row 3): each must be a heading."""
    headings = set(SGLANG_HEADING.findall((DOCS / "sglang.md").read_text()))
    assert {"0", "1", "1.1", "1.6", "1.7", "2", "3", "3.1", "3.7", "4", "5", "6", "9"} <= headings
    missing = [f"{name}:{_where(text, m.start())}: {m.group(0)}"
               for name, text in files.items() if "docs/sglang.md" in text
               for m in SGLANG_SECTION.finditer(text) if m.group(1) not in headings]
    assert not missing, "sections cited that docs/sglang.md has no heading for:\n" + "\n".join(missing)


def test_invariant_numbers_cited_exist(files):
    text = (DOCS / "architecture.md").read_text()
    section = text.split("## Invariants", 1)[1].split("\n## ", 1)[0]
    numbered = {int(n) for n in re.findall(r"^(\d+)\. \*\*", section, re.MULTILINE)}
    assert numbered == set(range(1, 8)), f"docs/architecture.md numbers invariants {sorted(numbered)}"
    bad = [f"{name}:{_where(t, m.start())}: {m.group(0)}" for name, t in files.items()
           for m in INVARIANTS.finditer(t) if not {int(n) for n in re.findall(r"\d+", m.group(1))} <= numbered]
    assert not bad, "invariants cited that docs/architecture.md does not number:\n" + "\n".join(bad)


def test_sections_cited_by_name_exist(files):
    missing = []
    for name, text in files.items():
        for m in NAMED_SECTION.finditer(text):
            page, section = DOCS / f"{m.group(1)}.md", m.group(2) or m.group(3)
            if page.is_file() and section not in page.read_text():
                missing.append(f"{name}:{_where(text, m.start())}: {m.group(0)}")
    assert not missing, "sections cited by name that their page does not have:\n" + "\n".join(missing)


def test_the_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    missing = [p for p in pages if f"docs/{p}" not in readme]
    assert not missing, f"add {missing} to README.md's Documentation list"
