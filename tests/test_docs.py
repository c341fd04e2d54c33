"""The docs name only code that exists: every dotted `torchwarm.` name imports, every
`agent/` path is a file, and no doc names the folder `agent` as if it were importable."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "deploy").rglob("*.md")])
# File names that start with "torchwarm." (configs, locks, units), not modules.
FILE_SUFFIXES = {"yaml", "yml", "lock", "conf", "json", "service", "timer", "secret", "pub"}
DOTTED = re.compile(r"(?<![\w./-])torchwarm(?:\.[A-Za-z_]\w*)+")
AGENT_DOTTED = re.compile(r"(?<![\w./-])agent\.[A-Za-z_]\w*")
AGENT_PATH = re.compile(r"(?<![\w.-])agent/[\w/]+\.py\b")


def _names(pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for match in pattern.finditer(doc.read_text()):
            found.append((doc.relative_to(ROOT).as_posix(), match.group(0)))
    return found


def resolve(name: str) -> object:
    """Import the longest module prefix of `name`, then get the rest as attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


MODULE_NAMES = [(d, n) for d, n in _names(DOTTED) if n.rsplit(".", 1)[-1] not in FILE_SUFFIXES]


def test_docs_name_some_modules():
    """The scan finds names at all (a broken pattern would pass every check below)."""
    assert len(MODULE_NAMES) >= 5
    assert _names(AGENT_PATH)


@pytest.mark.parametrize(("doc", "name"), MODULE_NAMES, ids=[f"{d}:{n}" for d, n in MODULE_NAMES])
def test_dotted_name_imports(doc: str, name: str):
    """Each dotted `torchwarm.` name in the docs resolves to a module or an attribute."""
    try:
        resolve(name)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{doc} names {name}, which does not import: {e}")


def test_no_doc_imports_the_folder_name():
    """`agent` is the source folder; the import name is `torchwarm`."""
    assert _names(AGENT_DOTTED) == []


def test_agent_paths_exist():
    """Each `agent/….py` path in the docs is a file of the package."""
    missing = [(d, p) for d, p in _names(AGENT_PATH) if not (ROOT / p).is_file()]
    assert missing == []


def test_readme_map_lists_every_module():
    """The README's Layout table names each module of each folder, and no other."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout\n") : text.index("\n## ", text.index("## Layout\n") + 1)]
    listed: dict[str, set[str]] = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") or cells[0] == "top":
            folder = "" if cells[0] == "top" else cells[0].strip("`/")
            listed[folder] = set(re.findall(r"`([\w]+\.py)`", cells[1]))
    agent = ROOT / "agent"
    actual = {
        folder: {p.name for p in (agent / folder).glob("*.py") if p.name != "__init__.py"}
        for folder in ["", *(d.name for d in agent.iterdir() if (d / "__init__.py").exists())]
    }
    assert listed == actual
