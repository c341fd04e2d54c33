"""The precompile hook of command workloads: how a command's own process saves its Dynamo
entries, and what it says about itself.

A command workload captured as `precompile` is started through `python -m
torchwarm.seed.hook -- ARGV` (launch_argv), which puts this folder first on PYTHONPATH
and execs ARGV. Every Python process of the command then runs this folder's
sitecustomize.py at start: it turns torch's caching-precompile mode on before torch is
imported, and at exit, if torch was imported, calls at_exit() here, which
  - calls torch.compiler.save_cache_artifacts(), writing the Dynamo entries into the
    cache dir (TORCHINDUCTOR_CACHE_DIR), as the model child does;
  - writes RECORD_PREFIX<pid>.json into that dir: the installed distributions the
    process imported (codeid.distribution_identity: name, version, digest) and the
    modules it imported that belong to none (files the workload's `code` must hold);
  - prints one line {"torchwarm_hook": {"counters": {...}}} (torch's cache counters).
A hook, rather than a call the user adds to the script, keeps the app unchanged: the
same script runs on the seed and under `torchwarm run` on a node, where nothing of this
is on the path.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HOOK_DIR = Path(__file__).resolve().parent  # what goes first on the command's PYTHONPATH
LINE_KEY = "torchwarm_hook"  # the line at exit: {"torchwarm_hook": {"counters": {...}}}
RECORD_PREFIX = ".torchwarm-hook-"  # in the cache dir; a capture never takes .torchwarm*
_SKIP = ("sitecustomize", "__main__", "__mp_main__")
_TAIL_BYTES = 1 << 20  # the line is among the last: a server's long log is not read whole


def launch_argv(argv: Sequence[str]) -> tuple[str, ...]:
    """`argv` started with the hook on its PYTHONPATH."""
    return (sys.executable, "-m", "torchwarm.seed.hook", "--", *argv)


def at_exit(
    files: Mapping[str, str | None], at_start: frozenset[str], start_path: Sequence[str]
) -> None:
    """In the command's process, at exit (sitecustomize): save, record, report.

    `files`: each top-level module the process imported -> its file; `at_start`: the
    modules the interpreter had imported before the hook ran; `start_path`: sys.path
    then (what a node's `torchwarm pull`, started the same way, searches too).
    """
    import torch

    from torchwarm.env import codeid, compat
    from torchwarm.util import fs

    try:
        torch.compiler.save_cache_artifacts()
    except Exception as e:  # the warm-up says no entries were written; say why here
        print(f"torchwarm hook: save_cache_artifacts failed: {e}", file=sys.stderr)
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cache:
        by_dist, unowned = _imported(files, at_start, start_path)
        dists, errors = [], []
        for name, modules in sorted(by_dist.items()):
            try:
                found = codeid.distribution_identity(name, sorted(modules))  # as a node
            except Exception as e:  # recorded: the seed then drops the entries, saying why
                errors.append(f"{name}: {e}")
            else:
                dists.append(found.to_dict())
        doc = {"pid": os.getpid(), "distributions": dists, "unowned": unowned, "errors": errors}
        target = Path(cache) / f"{RECORD_PREFIX}{os.getpid()}.json"
        fs.atomic_write_bytes(target, json.dumps(doc, indent=1, sort_keys=True).encode())
    c = compat.counters()
    flat = {n: int(c[group][n]) for group, names in compat.COUNTERS.items() for n in names}
    print(json.dumps({LINE_KEY: {"counters": flat}}), file=sys.stderr, flush=True)


def _imported(
    files: Mapping[str, str | None], at_start: frozenset[str], start_path: Sequence[str]
) -> tuple[dict[str, set[str]], dict[str, str]]:
    """The distributions the process imported from (name -> its top-level modules), and
    the modules it imported that belong to none (name -> file).

    A module is attributed by where its file lies: below a folder of `start_path`, to the
    distribution that installed the top-level name there. So a copy that a distribution
    vendors and puts on sys.path while it runs (setuptools' `_vendor/jaraco`) counts as
    that distribution's (`setuptools`), whose RECORD covers it; a module found through an
    editable install's finder (outside the path) goes by its name.
    """
    owners = _owners(start_path)
    roots = [Path(p or os.curdir).resolve() for p in start_path]
    by_dist: dict[str, set[str]] = {}
    unowned = {}
    for top, file in files.items():
        if top in sys.stdlib_module_names or top in _SKIP or file and _in_stdlib(file):
            continue
        name = (_anchor(Path(file), roots) if file else None) or top
        if name in owners:
            for dist in owners[name]:
                by_dist.setdefault(dist, set()).add(name)
        elif file and top not in at_start:
            unowned[top] = file
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if script and getattr(main, "__spec__", None) is None and not _in_scripts(script):
        unowned["__main__"] = script  # a script run by path (-m: its package is above)
    return by_dist, unowned


def _owners(path: Sequence[str]) -> dict[str, list[str]]:
    """Top-level import name -> the distributions on `path` that install it (as
    importlib.metadata.packages_distributions, for one path)."""
    import inspect
    from importlib import metadata

    out: dict[str, list[str]] = {}
    for dist in metadata.distributions(path=list(path)):
        names = set((dist.read_text("top_level.txt") or "").split())
        if not names:
            for f in dist.files or ():
                if len(f.parts) > 1 and f.parts[0] != "..":
                    names.add(f.parts[0])
                elif len(f.parts) == 1 and (mod := inspect.getmodulename(f.parts[0])):
                    names.add(mod)
        for n in names:
            if dist.metadata["Name"] not in out.setdefault(n, []):
                out[n].append(dist.metadata["Name"])
    return out


def _anchor(file: Path, roots: Sequence[Path]) -> str | None:
    """The top-level import name `file` lies under, below the innermost folder of `roots`
    that holds it; None when none does."""
    p = file.resolve()
    best = None
    for r in roots:
        if p.is_relative_to(r) and p != r and (best is None or len(r.parts) > len(best.parts)):
            best = r
    if best is None:
        return None
    first = p.relative_to(best).parts[0]
    return first.split(".", 1)[0] if p.parent == best else first


def _in_stdlib(path: str) -> bool:
    """Whether `path` is a file of Python's own library (a module that
    sys.stdlib_module_names leaves out, such as _sysconfigdata_*), not of site-packages,
    which may lie inside it."""
    import sysconfig

    paths = sysconfig.get_paths()
    p = Path(path).resolve()
    sites = [Path(paths[k]).resolve() for k in ("purelib", "platlib")]
    libs = [Path(paths[k]).resolve() for k in ("stdlib", "platstdlib")]
    return any(p.is_relative_to(d) for d in libs) and not any(p.is_relative_to(d) for d in sites)


def _in_scripts(path: str) -> bool:
    """Whether `path` is in this environment's scripts folder (a console-script wrapper,
    which its distribution's RECORD covers)."""
    import sysconfig

    scripts = Path(sysconfig.get_path("scripts")).resolve()
    return Path(path).resolve().parent == scripts


def records(cache: Path) -> list[dict[str, Any]]:
    """What the hook wrote in `cache`, one record per process that imported torch."""
    out = []
    for path in sorted(cache.glob(f"{RECORD_PREFIX}*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def read_line(log: Path) -> dict[str, int] | None:
    """The counters of the last hook line in a command's log; None when there is none."""
    with log.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
        tail = f.read().decode(errors="replace")
    for line in reversed(tail.splitlines()):
        if LINE_KEY not in line:
            continue
        try:
            body = json.loads(line).get(LINE_KEY)
        except (ValueError, AttributeError):
            continue
        if isinstance(body, dict) and isinstance(body.get("counters"), dict):
            return {k: v for k, v in body["counters"].items() if isinstance(v, int)}
    return None
