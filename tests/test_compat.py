"""torch's internals are reached only through torchwarm.env.compat, which names the torch
versions it is known for and refuses others in one line: hard at the seed, as a cold
start with that reason on a node (fail-open)."""

from __future__ import annotations

import io
import json
import re
import shutil
import tokenize
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from conftest import WORKLOAD, torchwarm

from torchwarm.env import compat
from torchwarm.errors import ConfigError, UnsupportedTorch

AGENT = Path(__file__).resolve().parent.parent / "agent"
COMPAT = AGENT / "env" / "compat.py"
# `torch._x` in code or in a string ("torch._inductor" for importlib), `from torch import
# _x`, `getattr(torch, "_x")`. Dunders (torch.__version__) are public.
INTERNAL = re.compile(
    r"\btorch\s*\.\s*_(?!_)|\bfrom\s+torch\s+import\s+\(?\s*_(?!_)"
    r"|getattr\(\s*torch\s*,\s*[\"']_(?!_)"
)


def code_lines(path: Path) -> dict[int, str]:
    """A file's lines without their comments (a comment that names torch's private module
    is prose, not a use); strings and docstrings stay."""
    lines = path.read_text().splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col]
    return dict(enumerate(lines, start=1))


def test_no_torch_internals_outside_the_compat_module():
    """No file of agent/ but env/compat.py touches a private torch module or attribute."""
    found = [
        f"{path.relative_to(AGENT.parent)}:{n}: {line.strip()}"
        for path in sorted(AGENT.rglob("*.py"))
        if path != COMPAT
        for n, line in code_lines(path).items()
        if INTERNAL.search(line)
    ]
    assert not found, "torch internals outside agent/env/compat.py:\n" + "\n".join(found)


def test_the_supported_versions_pass_and_any_other_is_one_line():
    """2.13 (any patch, local build tags included) passes; 2.12 and 2.14 are refused with
    what is supported, what is here, and what to do."""
    for ok in ("2.13.0", "2.13.0+cpu", "2.13.2", "2.13.0a0+git1234abc"):
        compat.require_supported(ok)
    for bad in ("2.12.1", "2.14.0", "3.0.0"):
        with pytest.raises(UnsupportedTorch) as e:
            compat.require_supported(bad)
        assert isinstance(e.value, ConfigError)
        assert re.fullmatch(
            rf"torchwarm \S+ supports torch 2\.13; this is torch {re.escape(bad)}: install "
            r"a supported torch \(pip install 'torch>=2\.13,<2\.14'\)",
            str(e.value),
        ), str(e.value)


def fake_torch_dist(root: Path, version: str, record: bool = True) -> Path:
    """A folder for PYTHONPATH holding a copy of torch's dist-info that says `version`
    (and has no RECORD, with record=False); torch's package itself stays the real one."""
    info = Path(metadata.distribution("torch")._path)  # type: ignore[attr-defined]
    copy = root / info.name
    shutil.copytree(info, copy)
    meta = (copy / "METADATA").read_text()
    (copy / "METADATA").write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}", meta))
    if not record:
        (copy / "RECORD").unlink()
    return root


def test_a_seed_on_an_unsupported_torch_stops_before_warming_up(tmp_path):
    """`warmup` with torch 2.12 installed exits 2 with the one line and runs nothing
    (here: a command workload that would have written a file)."""
    ran = tmp_path / "ran"
    cfg = tmp_path / "seed.yaml"
    cfg.write_text(yaml.safe_dump({
        "store": (tmp_path / "store").as_uri(), "cache_dir": str(tmp_path / "cache"),
        "workloads": [{"name": "cmd", "command": ["touch", str(ran)]}],
    }))  # fmt: skip
    env = {"PYTHONPATH": str(fake_torch_dist(tmp_path / "old", "2.12.0"))}
    proc = torchwarm("warmup", "-c", str(cfg), "--out", str(tmp_path / "out"), env=env,
                     check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "supports torch 2.13; this is torch 2.12.0: install a supported torch" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not ran.exists()


def test_a_node_that_must_ask_an_unsupported_torch_starts_cold_with_the_reason(tmp_path):
    """A node whose torch has no RECORD (its digest must come from torch itself) and is
    2.12 pulls fail-open: exit 0, cold, and the marker says why in the one line."""
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({
        "store": str(tmp_path / "store"), "cache_dir": str(tmp_path / "n" / "cache"),
        "workloads": [WORKLOAD],
    }))  # fmt: skip
    (tmp_path / "store").mkdir()
    env = {"PYTHONPATH": str(fake_torch_dist(tmp_path / "old", "2.12.0", record=False))}
    proc = torchwarm("pull", "-c", str(cfg), "--json", env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == "cold"
    reason = report["workloads"][0]["reason"]
    assert "supports torch 2.13; this is torch 2.12.0: install a supported torch" in reason
