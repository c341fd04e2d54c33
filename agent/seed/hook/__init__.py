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
_TAIL_BYTES = 1 << 20  # the lines are among the last: a server's long log is not read whole


def launch_argv(argv: Sequence[str]) -> tuple[str, ...]:
    """`argv` started with the hook on its PYTHONPATH."""
    return (sys.executable, "-m", "torchwarm.seed.hook", "--", *argv)


def at_exit(
    files: Mapping[str, Sequence[str]], at_start: frozenset[str], start_path: Sequence[str]
) -> None:
    """In the command's process, at exit (sitecustomize): save, record, report.

    `files`: each module the process imported (submodules too) -> its file, or a
    namespace package's folders; `at_start`: the modules the interpreter had imported
    before the hook ran; `start_path`: sys.path then (what a node's `torchwarm pull`,
    started the same way, searches too).
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
            if odd := sorted(m for m in modules if not codeid.MODULE_NAME.fullmatch(m)):
                errors.append(f"{name}: module names a manifest cannot hold: {odd}")
                continue
            try:
                found = codeid.distribution_identity(name, sorted(modules))  # as a node
            except Exception as e:  # recorded: the seed then drops the entries, saying why
                errors.append(f"{name}: {e}")
            else:
                dists.append({**found.to_dict(), **_module_digests(found, codeid)})
        doc = {"pid": os.getpid(), "distributions": dists, "unowned": unowned, "errors": errors}
        target = Path(cache) / f"{RECORD_PREFIX}{os.getpid()}.json"
        fs.atomic_write_bytes(target, json.dumps(doc, indent=1, sort_keys=True).encode())
    c = compat.counters()
    flat = {n: int(c[group][n]) for group, names in compat.COUNTERS.items() for n in names}
    print(json.dumps({LINE_KEY: {"counters": flat}}), file=sys.stderr, flush=True)


def _module_digests(found: Any, codeid: Any) -> dict[str, Any]:
    """For a distribution identified by its modules' code (an editable install), each
    module's digest: the seed merges processes that imported different modules of it."""
    if not found.digest.startswith("code:"):
        return {}
    return {"module_digests": codeid.module_digests(found.modules)}


def _imported(
    files: Mapping[str, Sequence[str]], at_start: frozenset[str], start_path: Sequence[str]
) -> tuple[dict[str, set[str]], dict[str, str]]:
    """The distributions the process imported from (name -> its top-level modules), and
    the modules it imported that belong to none (name -> file).

    A module is attributed by where its file lies, never by its name: to a distribution
    when the file is one of that distribution's installed files (so setuptools' vendored
    `_vendor/jaraco` is setuptools', and a local `yaml.py` is nobody's), to the standard
    library when it lies in Python's own library folders; a namespace package's folder
    when a distribution's files lie in it. Everything else is unowned: the workload's
    `code` must hold it, or the seed drops the entries.
    """
    owned = _owned_files(start_path)
    folders = _folders(owned)
    caches = _cache_roots()
    by_dist: dict[str, set[str]] = {}
    unowned: dict[str, str] = {}
    for name, paths in files.items():
        if name.partition(".")[0] in _SKIP:
            continue
        for raw in paths:
            real = os.path.realpath(raw)
            if not os.path.exists(real):
                continue  # made in memory (torch.ops says "_ops.py"): no file to hash
            if any(real.startswith(root) for root in caches):
                continue  # a kernel torch compiled or loaded: the capture itself
            if real in owned:
                dist, top = owned[real]
                by_dist.setdefault(dist, set()).add(top)
            elif not (_in_stdlib(real) or real in folders) and name not in at_start:
                unowned.setdefault(name, raw)
    main = sys.modules.get("__main__")
    # Python takes a script's __file__ away once it has run; its loader keeps the path.
    script = getattr(main, "__file__", None) or getattr(getattr(main, "__loader__", None),
                                                         "path", None)  # fmt: skip
    if script and getattr(main, "__spec__", None) is None and not _in_scripts(script):
        unowned["__main__"] = script  # a script run by path (-m: its package is above)
    return by_dist, unowned


def _cache_roots() -> tuple[str, ...]:
    """The compile caches of this process (their real paths, each ending in a separator):
    the modules torch loads from there are its compiled kernels, which travel in the
    capture (checked by digest on the node), not code of the app."""
    roots = (os.environ.get(v) for v in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"))
    return tuple(os.path.join(os.path.realpath(r), "") for r in roots if r)


def _owned_files(path: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Each file a distribution on `path` installed (real path) -> (its name, the
    top-level module the file is under). An editable install's sources are not among
    its files: its top-level modules' code files (codeid.code_files, found as import
    finds them, as its digest hashes them) stand for them."""
    import inspect
    from importlib import metadata

    from torchwarm.env import codeid

    out: dict[str, tuple[str, str]] = {}
    by_code: list[tuple[str, list[str]]] = []
    for dist in metadata.distributions(path=list(path)):
        name = dist.metadata["Name"]
        base = os.path.realpath(dist.locate_file(""))
        tops = set((dist.read_text("top_level.txt") or "").split())
        for f in dist.files or ():
            if not f.parts or f.parts[0] == "..":
                continue  # a script in bin/: no module of it is imported from there
            top = f.parts[0] if len(f.parts) > 1 else inspect.getmodulename(f.parts[0])
            if top and not top.endswith((".dist-info", ".egg-info", ".data")):
                out.setdefault(os.path.normpath(os.path.join(base, str(f))), (name, top))
                if not top.startswith("__editable__"):  # the install's own hook
                    tops.add(top)
        if not dist.read_text("RECORD") or codeid.editable(dist):
            by_code.append((name, sorted(tops)))
    for name, tops in by_code:  # after every installed file: those are the installs'
        for top in tops:
            try:
                found = codeid.code_files(top)
            except Exception:  # named by its metadata, not importable: nothing to own
                continue
            for file in found.values():
                out.setdefault(os.path.realpath(file), (name, top))
    return out


def _folders(owned: Mapping[str, object]) -> set[str]:
    """Every folder that holds a distribution's file, at any depth (a namespace package
    shared by installed distributions)."""
    out: set[str] = set()
    for file in owned:
        d = os.path.dirname(file)
        while d not in out and d != os.path.dirname(d):
            out.add(d)
            d = os.path.dirname(d)
    return out


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


def read_lines(log: Path) -> list[dict[str, int]]:
    """The counters of every hook line in a command's log, one per Python process that
    imported torch, in the order they exited."""
    with log.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
        tail = f.read().decode(errors="replace")
    out = []
    for line in tail.splitlines():
        if LINE_KEY not in line:
            continue
        try:
            body = json.loads(line).get(LINE_KEY)
        except (ValueError, AttributeError):
            continue
        if isinstance(body, dict) and isinstance(body.get("counters"), dict):
            out.append({k: v for k, v in body["counters"].items() if isinstance(v, int)})
    return out
