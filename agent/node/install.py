"""Install a new cache tree into the cache directory all at once, or not at all.

The new tree is exactly the manifests' trees: each workload being installed fills an
empty folder of its own (the first one the staging folder itself, the others moved into
it file by file), then the files that the other workloads of the tree in place installed
are hard-linked in beside them, where they do not clash with the new ones. Nothing else
of the previous tree is carried over: not an earlier copy of the same workload (so a
reinstall costs what an install into an empty folder does), not a file no manifest named
(the app's own compiles, an operator's file or link, what a source now refused left).
Which files each workload installed is kept in the workdir in a record named by the
identity (device, inode) of the tree it describes, written before the swap: the rename
gives the cache dir the staged tree's identity, so the record found under the cache
dir's identity is always the one of the tree in place, whatever was interrupted when.
A file is taken from the previous tree only when it is still the file that was
installed (same inode), a regular one.

The staged tree is made durable by one syncfs(2) of the volume (an fsync per file, each
a journal commit, cost more than the unpacking of a tree of thousands of files), then
the staging folder is swapped in with one rename:
renameat2(RENAME_EXCHANGE) on Linux, where there is never a moment without a cache
dir; elsewhere two renames, where a crash between them leaves no cache dir (which the
next install repairs from the kept previous tree). A reader thus sees the previous
tree or the complete new one, never a half-installed one. The rename is the commit
point: the previous tree, moved into the workdir by it, is deleted only after the
caller has been told (`after_swap`), and one that a stopped process left there is
deleted by the next install.

Because of that rename, the cache dir must not itself be a mount point: mount the
volume one level up and point cache_dir at a folder inside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from torchwarm.errors import InstallError
from torchwarm.util.fs import (
    atomic_write_bytes,
    fsync_dir,
    read_json,
    remove_tree,
    sync_volume,
    walk,
)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_RECORD_VERSION = 1


def workdir(cache_dir: Path) -> Path:
    """torchwarm's private folder beside the cache dir: staging trees, downloads, scratch."""
    return cache_dir.parent / f".{cache_dir.name}.torchwarm"


@dataclass(frozen=True)
class Part:
    """One workload's share of a new tree: `fill(folder)` writes its files into an empty
    folder; `about` is recorded with them (which manifest, who signed it)."""

    name: str
    fill: Callable[[Path], None]
    about: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Held:
    """A workload's share of the tree in the cache dir, as its install recorded it:
    `about` as given, and its files (relative path -> inode)."""

    about: dict[str, Any]
    files: dict[str, int]


@contextlib.contextmanager
def locked(cache_dir: Path) -> Iterator[Path]:
    """Serialise installers of one cache dir, repair an interrupted swap, yield the workdir."""
    if os.path.lexists(cache_dir) and not cache_dir.is_dir():
        raise InstallError(
            f"cache_dir {cache_dir} is not a folder (a file, or a link to nothing); "
            "remove it, or point cache_dir at a folder of its own"
        )
    if cache_dir.exists() and os.path.ismount(cache_dir):
        raise InstallError(
            f"cache_dir {cache_dir} is a mount point, which cannot be swapped atomically; "
            f"mount the volume at {cache_dir.parent} and keep cache_dir a folder inside it"
        )
    work = workdir(cache_dir)
    try:
        work.mkdir(parents=True, exist_ok=True)
        lock = (work / "lock").open("a")
    except OSError as e:
        raise InstallError(
            f"cannot create {work}: {e.strerror}; is {cache_dir.parent} writable?"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _recover(cache_dir, work)
        yield work


def tidy(cache_dir: Path) -> bool:
    """Now, what the next `locked` does first (repair an interrupted swap, delete what a
    stopped installer left), unless an installer holds the lock (it has done it); False
    then, or when there is no workdir."""
    work = workdir(cache_dir)
    try:
        lock = (work / "lock").open("a")
    except OSError:
        return False
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        with contextlib.suppress(OSError):
            _recover(cache_dir, work)
    return True


def contents(cache_dir: Path) -> dict[str, Held]:
    """What each workload installed in the tree in the cache dir, by workload name; empty
    when its install left no record (an older torchwarm, a tree made by hand)."""
    try:
        st = os.stat(cache_dir)
    except OSError:
        return {}
    doc = read_json(_record_path(workdir(cache_dir), st))
    if not isinstance(doc, dict) or doc.get("version") != _RECORD_VERSION:
        return {}
    parts = doc.get("parts")
    if not isinstance(parts, dict):
        return {}
    held: dict[str, Held] = {}
    for name, part in parts.items():
        if not isinstance(part, dict):
            continue
        about, files = part.get("about"), part.get("files")
        if isinstance(about, dict) and isinstance(files, dict):
            ok = {p: i for p, i in files.items() if _relative(p) and type(i) is int}
            held[name] = Held(about, ok)
    return held


def _reraise(part: Part, error: Exception) -> None:
    raise error


def install(
    cache_dir: Path,
    parts: Sequence[Part],
    keep: Callable[[str, Mapping[str, Any]], bool] = lambda name, about: True,
    before_swap: Callable[[Path, list[str]], None] = lambda staging, names: None,
    after_swap: Callable[[list[str]], None] = lambda names: None,
    on_failure: Callable[[Part, Exception], None] = _reraise,
) -> list[str]:
    """Build the new tree from `parts`, plus the shares of the workloads of the tree in
    place that are not among them and that `keep(name, about)` accepts; swap it in;
    return the names of the parts installed.

    Call inside `locked(cache_dir)`. A fill that raises goes to `on_failure(part,
    error)`: by default it raises again, and the cache dir is untouched; one that returns
    leaves that part out and goes on with the others (fail-open), and when no part is
    left nothing is swapped. A file of a kept share that clashes with a new one (the same
    path a folder in one and a file in the other, or the same file) gives way to the new
    one; two parts that clash so are an InstallError. `before_swap(staging, names)` runs
    last before the swap, on the complete tree: if it raises (the deadline passed), the
    swap does not happen. The swap is the commit point: `after_swap(names)` runs right
    after it (the new tree in place, its rename on disk), and only then is the previous
    tree deleted; a process stopped before that leaves it to the next `locked`
    (`_recover`).
    """
    work = workdir(cache_dir)
    staging = work / f"staging-{os.getpid()}"
    _rmtree(staging)
    held = contents(cache_dir)
    record: Path | None = None
    try:
        staging.mkdir()
        shares = _fill(parts, staging, work, on_failure)
        if not shares:
            _discard(staging, None)
            return []
        names = list(shares)
        for name, h in held.items():
            if name not in shares and keep(name, h.about):
                shares[name] = Held(h.about, _link_kept(cache_dir, staging, h.files))
        sync_volume(staging)
        record = _write_record(work, os.stat(staging), shares)
    except OSError as e:
        _discard(staging, record)
        raise InstallError(f"cannot build the new cache tree in {staging}: {e}") from None
    except BaseException:
        _discard(staging, record)
        raise
    try:
        before_swap(staging, names)
        previous = _swap(staging, cache_dir, work)
    except BaseException:
        _discard(staging, record)
        raise
    try:
        after_swap(names)
    finally:
        if previous is not None:
            _rmtree(previous)
        _drop_other_records(cache_dir, work)
    return names


def _fill(parts: Sequence[Part], staging: Path, work: Path,
          on_failure: Callable[[Part, Exception], None]) -> dict[str, Held]:  # fmt: skip
    """Each part's files, written by its fill into a folder of its own and gathered in
    `staging` (the first part that fills writes into `staging` itself); a part whose fill
    raises and that `on_failure` lets go is left out, its files with it."""
    shares: dict[str, Held] = {}
    owner: dict[str, str] = {}  # path -> the part it came from, to name a clash
    for i, part in enumerate(parts):
        first = not shares
        folder = staging if first else work / f"staging-{os.getpid()}-{i}"
        try:
            if not first:
                _rmtree(folder)
                folder.mkdir()
            try:
                part.fill(folder)
            except Exception as e:  # noqa: BLE001 - the caller's to decide
                if first:  # empty the staging folder for the next part
                    _rmtree(staging)
                    staging.mkdir()
                on_failure(part, e)
                continue
            files = _files(folder)
            if not first:
                _move_in(folder, staging, files, part.name, owner)
        finally:
            if not first:
                _rmtree(folder)
        owner.update(dict.fromkeys(files, part.name))
        shares[part.name] = Held(dict(part.about), files)
    if len(shares) > 1:  # a path two parts wrote holds the later one's file: both share it
        final = {p: i for h in shares.values() for p, i in h.files.items()}
        shares = {n: Held(h.about, {p: final[p] for p in h.files}) for n, h in shares.items()}
    return shares


def _files(root: Path) -> dict[str, int]:
    """The regular files under `root`: relative path -> inode."""
    out = {}
    top = os.fspath(root)
    for dirpath, names in walk(root):
        rel = os.path.relpath(dirpath, top)
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                out[name if rel == "." else f"{rel}/{name}"] = st.st_ino
    return out


def _move_in(src: Path, dest: Path, files: dict[str, int], name: str,
             owner: dict[str, str]) -> None:  # fmt: skip
    """Move `files` of `src` into `dest`, replacing a file there of the same path; a path
    that is a folder on one side and a file on the other is an InstallError."""
    for rel in files:
        target = dest / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_dir() and not target.is_symlink():
                raise IsADirectoryError(errno.EISDIR, "is a folder")
            os.replace(src / rel, target)
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            clash = next((p for p in _prefixes(rel) if p in owner), rel)
            other = owner.get(clash) or next(
                (w for p, w in owner.items() if p.startswith(f"{rel}/")), "another"
            )
            raise InstallError(
                f"workloads {other!r} and {name!r} both install {clash!r}, one as a file and "
                "the other as a folder; publish them into separate cache dirs"
            ) from None


def _prefixes(rel: str) -> list[str]:
    parts = rel.split("/")
    return ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]


def _link_kept(cache_dir: Path, staging: Path, files: dict[str, int]) -> dict[str, int]:
    """Hard-link into `staging` the files of a kept share that are still the ones it
    installed (a copy where a link is not possible); the share as it now stands."""
    dev = os.stat(cache_dir).st_dev
    kept = {}
    for rel, ino in files.items():
        src, dest = cache_dir / rel, staging / rel
        try:
            st = os.lstat(src)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (dev, ino):
                continue  # gone, or not the file that was installed there
            there = os.lstat(dest) if os.path.lexists(dest) else None
            if there is not None:
                if stat.S_ISREG(there.st_mode):
                    kept[rel] = there.st_ino  # a new share has it too: theirs in common
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
        except (FileNotFoundError, FileExistsError, NotADirectoryError):
            continue  # clashes with a new share's tree: the new one stands
        try:
            os.link(src, dest)
        except OSError:
            shutil.copy2(src, dest)
        kept[rel] = os.lstat(dest).st_ino
    return kept


def _relative(p: Any) -> bool:
    """A record's path: relative, inside the tree."""
    if not isinstance(p, str) or not p or "\0" in p:
        return False
    pp = PurePosixPath(p)
    return not pp.is_absolute() and ".." not in pp.parts and pp.as_posix() == p


def _record_path(work: Path, st: os.stat_result) -> Path:
    return work / f"tree-{st.st_dev}-{st.st_ino}.json"


def _write_record(work: Path, st: os.stat_result, shares: dict[str, Held]) -> Path:
    """Write the record of the staged tree (`st`: its identity, which the rename keeps)."""
    parts = {n: {"about": h.about, "files": h.files} for n, h in shares.items()}
    doc = {"version": _RECORD_VERSION, "parts": parts}
    path = _record_path(work, st)
    atomic_write_bytes(path, json.dumps(doc, sort_keys=True).encode())
    return path


def _drop_other_records(cache_dir: Path, work: Path) -> None:
    """Delete every record but the one of the tree in the cache dir (and half-written ones)."""
    try:
        current = _record_path(work, os.stat(cache_dir)).name
    except OSError:
        current = ""
    for p in [*work.glob("tree-*.json"), *work.glob(".tree-*.tmp")]:
        if p.name != current:
            with contextlib.suppress(OSError):
                p.unlink()


def _discard(staging: Path, record: Path | None) -> None:
    """Undo a build that does not get swapped in."""
    _rmtree(staging)
    if record is not None:
        with contextlib.suppress(OSError):
            record.unlink()


def _swap(staging: Path, cache_dir: Path, work: Path) -> Path | None:
    """Rename `staging` to `cache_dir`; the folder that now holds the previous tree, if any."""
    previous: Path | None = None
    try:
        if not cache_dir.exists():
            os.rename(staging, cache_dir)
        elif _exchange(staging, cache_dir):
            previous = staging  # now holds the previous tree
        else:
            previous = work / f"previous-{os.getpid()}"
            os.rename(cache_dir, previous)
            try:
                os.rename(staging, cache_dir)  # a crash before this: _recover puts previous back
            except OSError:
                os.rename(previous, cache_dir)  # not swapped: the previous tree goes back now
                raise
        fsync_dir(cache_dir.parent)
    except OSError as e:
        raise InstallError(f"cannot swap the new cache into {cache_dir}: {e.strerror}") from e
    return previous


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths with renameat2(2); False where it is not available."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # kernel or filesystem without RENAME_EXCHANGE
    raise OSError(err, os.strerror(err))


def _recover(cache_dir: Path, work: Path) -> None:
    """Undo what a stopped installer left: restore a moved-away tree, drop staging folders
    and records of trees that are not in place."""
    previous = sorted(work.glob("previous-*"), key=lambda p: p.lstat().st_mtime)
    if previous and not cache_dir.exists():
        os.rename(previous.pop(), cache_dir)
        fsync_dir(cache_dir.parent)
    for leftover in [*previous, *work.glob("staging-*"), *work.glob("downloads-*")]:
        _rmtree(leftover)
    _drop_other_records(cache_dir, work)


def _rmtree(path: Path) -> None:
    remove_tree(path)
