"""Code identity: a digest of the model's code, computed from files, without importing them.

Precompiled Dynamo entries skip the tracing that would notice most code changes: torch
checks the source lines of the functions it inlined, but an edited module-level constant
or a function chosen in `__init__` runs the seed's code with no warning (docs/precompile.md).
So the seed records this identity and a node installs the entries only if its own copy of
the code gives the same one.

What is hashed: the top-level package of the workload's `model` (the whole package, since
the factory's module imports its siblings), found the way `import` would find it on the
search path but never imported. Inside it: Python sources and native extension modules.
Data files, caches and other packages are not hashed (docs/precompile.md says why).
For a top-level module (`mymodel:build`), its directory's other top-level `.py` files
are hashed with it: they are what it can import as siblings.

A command workload's identity (command_identity) is its `code` files and the installed
distributions it imported, each by name, version and the digest of its RECORD file
(distribution_identity), read from metadata the same way on seed and node.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchwarm.errors import ConfigError

if TYPE_CHECKING:
    from torchwarm.config import Workload

# What counts as code in a package: sources and native extension modules.
CODE_SUFFIXES = (".py", *importlib.machinery.EXTENSION_SUFFIXES)
_SKIP_DIRS = {"__pycache__"}


@dataclass(frozen=True)
class CodeIdentity:
    package: str  # the top-level import name that was hashed
    sha256: str  # over the sorted (path, content digest) list
    files: int

    def to_dict(self) -> dict[str, Any]:
        return {"package": self.package, "sha256": self.sha256, "files": self.files}


def top_level(model: str) -> str:
    """The top-level import name of a `package.module:callable` spec."""
    return model.partition(":")[0].split(".")[0]


def code_files(package: str, search_path: Sequence[str] | None = None) -> dict[str, Path]:
    """The code files of the top-level `package`: a stable name for each -> its path.

    Found as `import` would find it but never executed: without `search_path`, by this
    interpreter's finders (sys.meta_path: sys.path entries, and editable installs, whose
    finders map names to folders outside sys.path); with it, by importlib's PathFinder
    over those folders only. A top-level name has no parent package to import first.
    Raises ConfigError when nothing provides `package`.
    """
    if search_path is None:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"package {package!r} cannot be located: {e}") from None
    else:
        spec = importlib.machinery.PathFinder.find_spec(package, [str(p) for p in search_path])
    if spec is None:
        raise ConfigError(f"package {package!r} is not on this Python's path")
    files: dict[str, Path] = {}
    if spec.submodule_search_locations is not None:  # a package (regular or namespace)
        for i, root in enumerate(spec.submodule_search_locations):
            for f in _walk(Path(root)):
                files[f"{i}/{f.relative_to(root).as_posix()}"] = f
    elif spec.origin and Path(spec.origin).is_file():
        origin = Path(spec.origin)
        files[origin.name] = origin
        for sibling in sorted(origin.parent.glob("*.py")):
            if sibling.is_file():
                files.setdefault(sibling.name, sibling)
    else:
        raise ConfigError(f"package {package!r} has no source files to hash (built in?)")
    return files


def _walk(root: Path) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*")):
        if any(part in _SKIP_DIRS for part in p.relative_to(root).parts):
            continue
        if p.name.endswith(CODE_SUFFIXES) and p.is_file():
            out.append(p)
    return out


def code_identity(model: str, search_path: Sequence[str] | None = None) -> CodeIdentity:
    """The identity of the code behind `model`, found on `search_path` (default: as this
    interpreter would import it)."""
    package = top_level(model)
    files = code_files(package, search_path)
    h = hashlib.sha256(f"torchwarm-code-identity-1\0{package}\0".encode())
    for name in sorted(files):
        h.update(name.encode() + b"\0" + _file_sha256(files[name]).encode() + b"\0")
    return CodeIdentity(package, h.hexdigest(), len(files))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def workload_identity(w: Workload) -> str:
    """A digest of the workload settings that shape the compiled code.

    Torch drops identity guards in precompile mode, so a model built with other
    arguments (say, another activation picked in `__init__`) would run the seed's graph.
    Input shapes and the seed are left out: guards check shapes, and weights are inputs.
    The method called, the compile target and the keyword inputs (constants by value,
    tensors by name) count only when set, so that a workload without them keeps the
    digest it had before they existed.
    """
    from torchwarm.config import TensorSpec

    doc: dict[str, Any] = {
        "model": w.model,
        "model_kwargs": dict(w.model_kwargs),
        "mode": w.mode,
        "device": w.device,
        "compile": w.compile.as_kwargs(),
    }
    if w.method != "__call__":
        doc["method"] = w.method
    if w.compile.target != "module":
        doc["target"] = w.compile.target
    if w.kwargs:
        doc["kwargs"] = [
            {
                "tensors": sorted(k for k, v in kw.items() if isinstance(v, TensorSpec)),
                "constants": {k: v for k, v in kw.items() if not isinstance(v, TensorSpec)},
            }
            for kw in w.kwargs
        ]
    data = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()


# -- command workloads -------------------------------------------------------------------------
# A command is the user's own process: its code is its `code` list (hashed as the warm-up
# key hashes it) and the installed distributions it imported, which the seed's hook
# (torchwarm.seed.hook) lists when the command exits. Each distribution is named by its
# version and a digest, computed here from metadata files alone, so that a node computes
# the same without running the app.


# A top-level module name the hook records and a manifest holds: import names, and names
# of files that are not identifiers (mypyc's `<hash>__mypyc` group modules).
MODULE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")


@dataclass(frozen=True)
class DistIdentity:
    name: str  # as its metadata spells it
    version: str
    digest: str  # "record:<sha256 of RECORD>", or "code:<sha256>" of its modules' files
    modules: tuple[str, ...]  # the top-level modules the command imported from it

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "digest": self.digest,
                "modules": list(self.modules)}  # fmt: skip


def distribution_identity(
    name: str, modules: Sequence[str], search_path: Sequence[str] | None = None
) -> DistIdentity:
    """The identity of the installed distribution `name` (found on `search_path`, default
    this sys.path, as import finds it), from which the command imported `modules`.

    The digest is the sha256 of its RECORD file, which lists every installed file with
    its own sha256, so a reinstall of other bytes under the same version changes it. An
    editable install's RECORD names only the link to its source folder, and an install
    without RECORD lists nothing: for those, the code files of `modules` are hashed, as
    code_identity hashes a model's package. ConfigError when it is not installed.
    """
    where = {} if search_path is None else {"path": [str(p) for p in search_path]}
    found = next(iter(metadata.distributions(name=name, **where)), None)
    if found is None:
        raise ConfigError(f"distribution {name!r} is not installed here")
    version = found.version
    record = found.read_text("RECORD")
    if record and not editable(found):
        digest = "record:" + hashlib.sha256(record.encode()).hexdigest()
    else:
        digest = modules_digest(module_digests(modules, search_path))
    return DistIdentity(found.metadata["Name"] or name, version, digest, tuple(sorted(modules)))


def module_digests(
    modules: Sequence[str], search_path: Sequence[str] | None = None
) -> dict[str, str]:
    """Each top-level module's digest over its code files (code_files), as found on
    `search_path` (default: as this interpreter imports it)."""
    out = {}
    for module in sorted(modules):
        files = code_files(module, search_path)
        h = hashlib.sha256(f"torchwarm-module-code-1\0{module}\0".encode())
        for rel in sorted(files):
            h.update(f"{rel}\0{_file_sha256(files[rel])}\0".encode())
        out[module] = h.hexdigest()
    return out


def modules_digest(digests: Mapping[str, str]) -> str:
    """A distribution's "code:" digest from its modules' digests (module_digests): so the
    seed can merge what several processes imported of one editable install."""
    h = hashlib.sha256(b"torchwarm-dist-code-2\0")
    for module in sorted(digests):
        h.update(f"{module}\0{digests[module]}\0".encode())
    return "code:" + h.hexdigest()


def editable(dist: Any) -> bool:
    """Whether pip recorded `dist` as an editable install (PEP 660, direct_url.json)."""
    try:
        doc = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        return False
    info = doc.get("dir_info") if isinstance(doc, dict) else None
    return isinstance(info, dict) and info.get("editable") is True


def command_identity(
    code: Sequence[Path],
    argv: Sequence[str],
    distributions: Sequence[DistIdentity],
) -> dict[str, Any]:
    """What a command workload's precompiled entries were made from: the digest of its
    `code` files (as its warm-up key has it), its arguments, and the distributions it
    imported. The program (argv[0]) is left out: an interpreter at another path is the
    same one when the fingerprint (Python, torch) is.

    ConfigError when a code path does not exist.
    """
    from torchwarm.seed.processes import code_digest  # the warm-up key's digest, one place

    return {
        "kind": "command",
        "code_sha256": code_digest(code),
        "args": list(argv[1:]),
        "distributions": [d.to_dict() for d in sorted(distributions, key=lambda d: d.name)],
    }
