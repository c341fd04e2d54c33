"""Crash-safe file primitives: write to a temp name beside the target, fsync, rename, fsync dir;
and walks and deletes of trees that neither recurse nor follow links.

On Python 3.11, os.walk and shutil.rmtree recurse once per folder level: a tree deeper
than the interpreter's recursion limit (about 1,000) raises RecursionError, even with
rmtree's ignore_errors. The two below keep their own stack.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def read_json(path: Path) -> Any:
    """The JSON document in `path`, or None when it is missing, unreadable or not JSON,
    nested too deep included (json.loads raises RecursionError for that, not ValueError):
    for the files a node keeps on its volume, which a damaged one must never make fatal."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def fsync_dir(path: Path) -> None:
    """Persist a directory entry change (a rename or create) in `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(target: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a file that replaces `target` atomically on clean exit, and vanishes on error.

    Readers see either the old content or the whole new content, never a prefix,
    even if the process is killed at any point.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_writer(target) as f:
        f.write(data)


def atomic_write_json(target: Path, doc: Any) -> None:
    """`doc` as indented JSON with sorted keys and a final newline, written atomically
    (the ready marker and the records kept beside it)."""
    atomic_write_bytes(target, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


def walk(root: Path) -> Iterator[tuple[str, list[str]]]:
    """(folder path, names of its non-folder entries) for `root` and every folder under it,
    parents first, without recursion; a link is an entry, never followed. An unreadable
    folder raises OSError (os.walk would skip it)."""
    todo = [os.fspath(root)]
    while todo:
        path = todo.pop()
        others = []
        with os.scandir(path) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
                else:
                    others.append(e.name)
        yield path, others


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (before it is renamed into place)."""
    for dirpath, filenames in walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def sync_volume(root: Path) -> None:
    """Make what was written under `root` durable: on Linux one syncfs(2) of its
    filesystem (every dirty page of the volume in one pass: an fsync per file is a
    journal commit each, seconds for a tree of thousands), elsewhere fsync_tree. syncfs
    reports writeback errors since Linux 5.8; an older kernel reports none."""
    fn = _syncfs()
    if fn is None:
        fsync_tree(root)
        return
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(root))
    finally:
        os.close(fd)


@functools.cache
def _syncfs() -> Any:
    """libc's syncfs, or None where there is none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    fn = getattr(ctypes.CDLL(name, use_errno=True), "syncfs", None)
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


def remove_tree(path: Path) -> None:
    """Delete `path` and what it holds, best effort: a plain file, a link (never what it
    points to) or a missing path is fine, and what cannot be deleted stays, silently.

    Iterative, and through folder descriptors (two open at a time): no recursion limit,
    and no path length limit however deep the tree. Going back up, each parent is checked
    to be the folder it came down from, so a folder moved meanwhile stops the walk
    rather than lead it elsewhere.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError:
        return
    # Per level below `path`: (its folder's identity, its name, its subfolders left to do).
    stack: list[tuple[tuple[int, int], str, list[str]]] = []
    subdirs = _clear_files(fd)
    while True:
        if subdirs:
            name = subdirs.pop()
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue
            here = os.fstat(fd)
            stack.append(((here.st_dev, here.st_ino), name, subdirs))
            os.close(fd)
            fd, subdirs = child, _clear_files(child)
            continue
        if not stack:
            break
        identity, name, subdirs = stack.pop()
        try:
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
        except OSError:
            break
        os.close(fd)
        fd = parent
        up = os.fstat(fd)
        if (up.st_dev, up.st_ino) != identity:
            break  # moved meanwhile: stop here
        with contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=fd)
    os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _clear_files(fd: int) -> list[str]:
    """Unlink every non-folder entry of the open folder `fd`; the names of its subfolders."""
    subdirs, others = [], []
    try:
        with os.scandir(fd) as it:
            for e in it:
                (subdirs if e.is_dir(follow_symlinks=False) else others).append(e.name)
    except OSError:
        return []
    for name in others:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=fd)
    return subdirs
