"""The precompile hook of command workloads (torchwarm.seed.hook): what a command's own
process records about the code it imported, and what the canary reads from its log.

One hooked run of a tiny app that imports torch (no compile, ~3 s): every claim about
what the hook records is read from the record that real process wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from torchwarm import config as cfgmod
from torchwarm.formats import precompile
from torchwarm.seed import canary, hook

APP = """\
import colorsys, yaml
import localns.mod
import torch
"""


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """An app whose folder holds a namespace package, a module named like a distribution's
    (yaml) and one named like the standard library's (colorsys), run under the hook."""
    root = tmp_path_factory.mktemp("hooked")
    app, cache = root / "app", root / "cache"
    (app / "localns").mkdir(parents=True)
    (app / "localns" / "mod.py").write_text("X = 1\n")
    (app / "yaml.py").write_text("Y = 1\n")
    (app / "colorsys.py").write_text("Z = 1\n")
    (app / "app.py").write_text(APP)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    argv = hook.launch_argv([sys.executable, "app.py"])
    subprocess.run(argv, cwd=app, env=env, check=True, timeout=120, capture_output=True)
    (record,) = hook.records(cache)
    return SimpleNamespace(app=app.resolve(), record=record)


def unowned_files(record: dict) -> set[Path]:
    return {Path(f).resolve() for f in record["unowned"].values()}


def test_a_local_namespace_packages_module_is_unowned(hooked):
    """A module of a namespace package (no __init__.py) in the app's folder is listed as
    belonging to no distribution, so the seed drops the entries unless code holds it."""
    assert hooked.app / "localns" / "mod.py" in unowned_files(hooked.record)


def test_the_script_itself_is_unowned(hooked):
    """The script run by path is the app's own code (Python drops its __file__ once it
    has run: the hook still finds it)."""
    assert hooked.app / "app.py" in unowned_files(hooked.record)


def test_a_local_module_named_like_a_distributions_is_not_that_distributions(hooked):
    """A local yaml.py is the app's own file, not PyYAML's: unowned, and PyYAML is not
    among the distributions the process imported."""
    assert hooked.app / "yaml.py" in unowned_files(hooked.record)
    assert "PyYAML" not in {d["name"] for d in hooked.record["distributions"]}


def test_a_local_module_named_like_the_standard_librarys_is_unowned(hooked):
    """A local colorsys.py is not the standard library's colorsys: unowned."""
    assert hooked.app / "colorsys.py" in unowned_files(hooked.record)


def test_installed_and_standard_modules_are_not_unowned(hooked):
    """torch (and what it imports) is attributed to its distribution; only the app's own
    files are unowned."""
    torch = [d for d in hooked.record["distributions"] if d["name"] == "torch"]
    assert torch and "torch" in torch[0]["modules"] and hooked.record["errors"] == []
    assert all(f.is_relative_to(hooked.app) for f in unowned_files(hooked.record))


# -- the canary reads every process's line ------------------------------------------------


def hook_line(**counters: int) -> str:
    return json.dumps({hook.LINE_KEY: {"counters": counters}})


def trial(monkeypatch, tmp_path: Path, lines: list[str]) -> tuple[str | None, dict]:
    """The canary's verdict on a command run whose log holds `lines`."""
    log = tmp_path / "warmup.log"
    log.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(canary.kinds, "run", lambda *a, **k: SimpleNamespace(log=log))
    return canary._command_trial(None, None, tmp_path, tmp_path, None)  # type: ignore[arg-type]


def test_a_load_error_in_any_process_drops_the_entries(monkeypatch, tmp_path):
    """A worker that failed to load an entry fails the canary even when the last process
    to exit (the launcher) counted a hit."""
    why, _ = trial(monkeypatch, tmp_path, [
        hook_line(dynamo_cache_hit=0, dynamo_cache_error=1),
        hook_line(dynamo_cache_hit=1, dynamo_cache_error=0),
    ])  # fmt: skip
    assert why is not None and "dynamo_cache_error 1" in why


def test_a_hit_in_one_process_passes_when_none_errs(monkeypatch, tmp_path):
    """A worker hit the entries and the launcher, which compiles nothing, exited last:
    the canary passes, and its summary holds every process's counters."""
    why, summary = trial(monkeypatch, tmp_path, [
        hook_line(dynamo_cache_hit=1, dynamo_cache_error=0),
        hook_line(dynamo_cache_hit=0, dynamo_cache_error=0),
    ])  # fmt: skip
    assert why is None and summary["counters"]["dynamo_cache_hit"] == 1


# -- record_command merges what every process imported -----------------------------------


def write_record(cache: Path, pid: int, modules: list[str]) -> None:
    dist = {"name": "torch", "version": "1", "digest": "record:" + "d" * 64, "modules": modules}
    doc = {"pid": pid, "distributions": [dist], "unowned": {}, "errors": []}
    (cache / f"{hook.RECORD_PREFIX}{pid}.json").write_text(json.dumps(doc))


def test_modules_of_a_distribution_are_merged_across_processes(tmp_path):
    """A module of a distribution that only a worker imported is in the identity too."""
    app = tmp_path / "app.py"
    app.write_text("pass\n")
    doc = {"store": str(tmp_path / "store"), "cache_dir": str(tmp_path / "node"),
           "format": "precompile",
           "workloads": [{"name": "app", "command": [sys.executable, str(app)],
                          "code": [str(app)]}]}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    w = cfgmod.load(tmp_path / "c.yaml").workloads[0]
    cache, out = tmp_path / "cache", tmp_path / "out"
    (cache / "dynamo" / ("a" * 64)).mkdir(parents=True)
    (cache / "dynamo" / ("a" * 64) / "entry").write_bytes(b"x")
    out.mkdir()
    write_record(cache, 1, ["torch"])
    write_record(cache, 2, ["functorch", "torch"])
    precompile.record_command(w, cache, out, {"counters": None})
    (d,) = precompile.read_state(out)["code_identity"]["distributions"]
    assert d["modules"] == ["functorch", "torch"]
