"""Small factories for the spine tests: manifests, configs, cache trees, archives, stores,
hostile configs and the limits a node's process is run under."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import resource
import signal
import sys
import tarfile
import textwrap
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zstandard

from torchwarm.formats import Captured
from torchwarm.spec import archive
from torchwarm.spec.manifest import BlobRef, Manifest
from torchwarm.stores.local import LocalStore

INJECT = Path(__file__).with_name("inject")  # its sitecustomize.py injects faults
CMD_APP = Path(__file__).with_name("cmd_app.py")
# A command workload that compiles nothing (tests/cmd_app.py): for claims about the seed's
# daemon and publish, not about torch. Its config needs COMMAND_ENV as the top-level env.
COMMAND = {"name": "cmd", "command": [sys.executable, str(CMD_APP)], "cwd": str(CMD_APP.parent),
           "code": [str(CMD_APP)]}  # fmt: skip
COMMAND_ENV = {"APP_CACHE_ROOT": "{cache_dir}/app"}  # its second cache root, under cache_dir


def inject_env(fault: str | None = None) -> dict[str, str]:
    """Variables for a new Python that loads tests/inject/sitecustomize.py (put first on
    PYTHONPATH), with `fault` ("module:attribute:action") as the fault it injects."""
    env = {"PYTHONPATH": os.pathsep.join([str(INJECT), os.environ.get("PYTHONPATH", "")])}
    if fault:
        env["TORCHWARM_TEST_INJECT"] = fault
    return env


FIELDS: dict[str, Any] = {
    "fingerprint_version": 1,
    "machine": "x86_64",
    "os": "Linux",
    "torch": "2.7.0+cpu",
    "torch_key": "ab" * 16,
    "cpu_vec_isa": "avx2",
    "threads": 8,
    "gpus": [],
    "compile_env": {},
}


def fields(**changes: Any) -> dict[str, Any]:
    """A made-up fingerprint dict; keyword arguments replace fields."""
    return {**FIELDS, **changes}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob(role: str = "cachedir", data: bytes = b"blob", media_type: str = archive.MEDIA_TYPE):
    return BlobRef(role, sha256(data), len(data), media_type)


def manifest(
    workload: str = "mlp",
    fmt: str = "cachedir",
    fingerprint: dict[str, Any] | None = None,
    blobs: tuple[BlobRef, ...] | None = None,
    **extra: Any,
) -> Manifest:
    """A valid Manifest; `blobs` defaults to one blob per role the format needs."""
    if blobs is None:
        roles = {"megacache": ("kernels", "megacache"), "precompile": ("cachedir", "dynamo")}
        blobs = tuple(blob(r, r.encode()) for r in roles.get(fmt, ("cachedir",)))
    extra.setdefault("created_at", "2024-01-02T03:04:05Z")
    extra.setdefault("created_by", "torchwarm test")
    extra.setdefault("warmup", {"input_sets": [[{"shape": [4, 64], "dynamic": [0]}]]})
    return Manifest(workload, fingerprint or fields(), fmt, blobs, **extra)


def write_config(folder: Path, text: str, name: str = "torchwarm.yaml") -> Path:
    """Write YAML `text` (dedented) to `folder/name` and return the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def minimal_config(folder: Path, extra: str = "", store: str = "store") -> Path:
    """A valid config with one CPU workload, relative paths, and `extra` YAML appended."""
    text = textwrap.dedent(f"""\
        store: {store}
        cache_dir: node/inductor
        workloads:
          - name: mlp
            model: torchwarm.models:mlp
            inputs:
              - [{{shape: [4, 64]}}]
        """)
    return write_config(folder, text + textwrap.dedent(extra))


def alias_bomb_inputs(k: int = 2400) -> str:
    """A workload's `inputs` as YAML flow text, ~20 KB at k = 2400: k aliases of one input
    set of k aliases of one tensor, k * k tensors once the aliases are expanded."""
    tensors = ", ".join(["&t {shape: [1]}"] + ["*t"] * (k - 1))
    sets = ", ".join([f"&s [{tensors}]"] + ["*s"] * (k - 1))
    return f"[{sets}]"


def limit_address_space() -> None:
    """A preexec_fn: the new process gets 2 GiB of address space (room for a node's pull,
    none for a config expanded to millions of nodes)."""
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def pids_hierarchy() -> Path | None:
    """A pids cgroup folder this process may create children in (v1 or v2), or None."""
    for root in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        controllers = root / "cgroup.subtree_control"
        v1 = (root / "pids.max").exists() or root.name == "pids"
        v2 = controllers.exists() and "pids" in controllers.read_text().split()
        if (v1 or v2) and os.access(root, os.W_OK):
            return root
    return None


class PidsCgroups:
    """New pids cgroups for one test, made under pids_hierarchy() (the test is skipped
    without root or one); close() kills what is left in them and removes them."""

    def __init__(self) -> None:
        root = pids_hierarchy()
        if os.geteuid() != 0 or root is None:
            pytest.skip("needs root and a writable pids cgroup hierarchy under /sys/fs/cgroup")
        self.root = root
        self.made: list[Path] = []

    def procs(self, n: int) -> Path:
        """The cgroup.procs file of a new group of at most `n` tasks: a pid written there
        joins it."""
        group = self.root / f"torchwarm-test-{uuid.uuid4().hex[:8]}"
        try:
            group.mkdir()
            self.made.append(group)
            (group / "pids.max").write_text(str(n))
        except OSError as e:
            pytest.skip(f"cannot make a pids cgroup in {self.root}: {e}")
        return group / "cgroup.procs"

    def close(self) -> None:
        for group in self.made:
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            for _ in range(50):
                with contextlib.suppress(OSError):
                    group.rmdir()
                    break
                time.sleep(0.1)


def joining(procs: Path) -> Callable[[], None]:
    """A preexec_fn: the new process joins the cgroup of `procs` (PidsCgroups.procs) before
    it runs anything, so that every process and thread it starts counts."""

    def join() -> None:
        procs.write_text(str(os.getpid()))

    return join


def make_tree(root: Path, files: dict[str, bytes], mtime: float | None = None) -> Path:
    """Create `files` (relative path -> bytes) under `root`; optionally set every mtime."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
    root.mkdir(parents=True, exist_ok=True)
    return root


def read_tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `root`: relative path -> (bytes, permission bits)."""
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = Path(dirpath, name)
            out[p.relative_to(root).as_posix()] = (p.read_bytes(), p.stat().st_mode & 0o7777)
    return out


@dataclass
class Member:
    """One hand-made tar member: name, type, mode, data, link target."""

    name: str
    data: bytes = b"x"
    type: bytes = tarfile.REGTYPE
    mode: int = 0o644
    linkname: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def hand_archive(dest: Path, members: list[Member]) -> Path:
    """Write a tar+zstd archive member by member, with no safety checks (for hostile ones)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.type
            info.mode = m.mode
            info.linkname = m.linkname
            for k, v in m.extra.items():
                setattr(info, k, v)
            if m.type == tarfile.REGTYPE:
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
            else:
                tar.addfile(info)
    dest.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    return dest


def captured(folder: Path, role: str, data: bytes) -> Captured:
    """A Captured blob file holding `data`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{role}.bin"
    path.write_bytes(data)
    return Captured(role, path, archive.MEDIA_TYPE)


class StoreWrapper:
    """A store that hands every call to `inner`; a test's subclass overrides the calls it
    interferes with."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.url = inner.url

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class RecordingStore:
    """Wraps a store and logs (method, key) for every call, in order."""

    def __init__(self, inner: LocalStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def recorded(key: str, *args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, key))
            return method(key, *args, **kwargs)

        return recorded

    def writes(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] in ("put", "put_if_version")]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def seed_files(cache: Path) -> dict[str, bytes]:
    """The seed's own cache files (not an extraction by torchwarm's archive code), less what
    never travels: torch's lock files and in-flight temp files."""
    return {
        rel: data
        for rel, data in tree(cache).items()
        if not rel.startswith("locks/") and not rel.endswith((".lock", ".tmp"))
    }


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
