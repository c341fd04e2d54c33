"""Warm-ups at the node's path: lend the config's cache_dir to one warm-up at a time.

Some caches hold their own absolute path: vLLM stores a standalone-compile handle as a
key and the absolute path of the artifact, and fails (FileNotFoundError) once its cache
root moves; its hash also takes paths derived from HOME or XDG. A warm-up in a fresh
folder expands {cache_dir} to another path than the node's, and such a cache misses
there. A workload with `at_node_path` therefore compiles with its cache at cache_dir's
exact path on the seed.

Whatever the seed has at that path is set aside and put back (`lend`), under a lock file
beside it, so two warm-ups never hold it at once (two seeds on one machine, or two
threads: flock locks belong to the open file, not the process). The names beside
cache_dir, all in its folder (renames there are atomic):
    <cache_dir>.torchwarm-seed.lock   the lock (kept: deleting it would race a waiter)
    <cache_dir>.torchwarm-aside       what was at cache_dir, while a warm-up holds it; a
                                      plain file (ABSENT) when nothing was there
A seed killed while the aside exists leaves cache_dir to a dead warm-up: the next lend,
once it holds the lock, deletes that and puts the aside back before anything else.

Nodes never take the lock: a seed must not run where an app uses that cache_dir.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from torchwarm.errors import Cancelled, ConfigError, WarmupError
from torchwarm.util import fs

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".torchwarm-seed.lock"
ASIDE_SUFFIX = ".torchwarm-aside"
ABSENT = b"torchwarm: nothing was at cache_dir before this warm-up\n"  # the aside, as a file
POLL_S = 0.2  # how often a waiter looks at the lock and its stop event
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


@contextlib.contextmanager
def lend(
    cache_dir: Path,
    keep: Path,
    stop: threading.Event | None = None,
    who: str = "a workload",
    wait_s: float = math.inf,
) -> Iterator[Path]:
    """Hold `cache_dir` for one warm-up and yield it, empty; on exit, whatever the warm-up
    left there moves to `keep` (a path that does not exist yet, e.g. its out_dir/cache) and
    what was at cache_dir before is back, whether the block ended well or not.

    Waits for another warm-up's lock (Cancelled once `stop` is set; WarmupError after
    `wait_s`, the warm-up's own timeout: a stuck holder must not hold it for ever). ConfigError when
    cache_dir's folder cannot be written, cache_dir is not a folder, or it cannot be
    renamed (a mount point); WarmupError when
    a dead warm-up's tree cannot be deleted. `who` names the workload in messages.
    """
    parent = cache_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(_beside(cache_dir, LOCK_SUFFIX), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno in _UNWRITABLE:
            raise ConfigError(
                f"{who} warms up at the node's path, cache_dir {cache_dir}, but "
                f"{_where(parent, e)} is not writable ({e.strerror}); run the seed where "
                "cache_dir is writable, or set at_node_path: false on the workload"
            ) from None
        raise ConfigError(
            f"{who} warms up at the node's path, cache_dir {cache_dir}, but cannot make "
            f"{e.filename or parent}: {e.strerror}; fix cache_dir, or set at_node_path: "
            "false on the workload"
        ) from None
    try:
        _wait_for(fd, cache_dir, stop, who, wait_s)
        _undo_dead_warmup(cache_dir)  # before anything else: the seed's tree comes back
        if os.path.lexists(cache_dir) and not os.path.isdir(cache_dir):
            raise ConfigError(
                f"{who} warms up at cache_dir {cache_dir}, which is not a folder; fix "
                "cache_dir or remove that file"
            )
        try:
            _set_aside(cache_dir, who)
            yield cache_dir
        finally:
            try:
                # The aside there means cache_dir is the warm-up's (else _set_aside failed
                # before it moved anything, and cache_dir is still the seed's).
                if os.path.lexists(_beside(cache_dir, ASIDE_SUFFIX)) and os.path.lexists(cache_dir):
                    _move(cache_dir, keep)
            finally:
                _undo_dead_warmup(cache_dir)
    finally:
        os.close(fd)  # releases the lock


def _beside(cache_dir: Path, suffix: str) -> Path:
    return cache_dir.with_name(cache_dir.name + suffix)


def _where(parent: Path, e: OSError) -> Path:
    """The folder that refused: the one holding what could not be created (the lock
    file, or the first missing folder on the way to `parent`)."""
    return Path(e.filename).parent if e.filename else parent


def _wait_for(
    fd: int, cache_dir: Path, stop: threading.Event | None, who: str, wait_s: float
) -> None:
    """Take the lock on `fd`, polling so that `stop` is seen, for at most `wait_s`; say
    once that it waits."""
    said = False
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pass
        if stop is not None and stop.is_set():
            raise Cancelled(f"warm-up of {who} cancelled while waiting for {cache_dir}")
        if time.monotonic() >= deadline:
            lock = _beside(cache_dir, LOCK_SUFFIX)
            raise WarmupError(
                f"{who}: another warm-up has held {cache_dir} for {wait_s:g} s (its "
                f"warmup_timeout_s), longer than this one may take; the holder's pid is in "
                f"{lock}: stop it, or let it finish and warm up again"
            )
        if not said:
            log.warning("%s: waiting for another warm-up at %s to end", who, cache_dir)
            said = True
        time.sleep(POLL_S)
    # Who holds it, for people looking at the file; nothing reads it back.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _undo_dead_warmup(cache_dir: Path) -> None:
    """With the aside there, cache_dir is a warm-up's (ours at exit, a killed seed's on
    entry): delete it and put the aside back. Nothing to do without an aside."""
    aside = _beside(cache_dir, ASIDE_SUFFIX)
    if not os.path.lexists(aside):
        return
    fs.remove_tree(cache_dir)
    if os.path.lexists(cache_dir):
        raise WarmupError(
            f"cannot delete {cache_dir}, a warm-up's tree; the seed's own is set aside at "
            f"{aside}: delete {cache_dir} by hand, then warm up again"
        )
    st = os.lstat(aside)
    if stat.S_ISREG(st.st_mode):  # ABSENT: nothing was there
        os.unlink(aside)
    else:
        os.rename(aside, cache_dir)
    fs.fsync_dir(cache_dir.parent)


def _set_aside(cache_dir: Path, who: str) -> None:
    """Move what is at cache_dir to the aside (or record that nothing was) and make
    cache_dir an empty folder. ConfigError when cache_dir cannot be renamed: a mount
    point (a Kubernetes volume, exactly where warming at the node's path matters) or a
    folder the seed may not rename."""
    aside = _beside(cache_dir, ASIDE_SUFFIX)
    if os.path.lexists(cache_dir):
        try:
            os.rename(cache_dir, aside)
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.EPERM, errno.EACCES, errno.EXDEV):
                raise
            why = ("it is a mount point" if e.errno in (errno.EBUSY, errno.EXDEV) else
                   "the seed may not rename it (not its owner in a sticky folder, or the "
                   "folder is not writable)")  # fmt: skip
            raise ConfigError(
                f"{who} warms up at the node's path, cache_dir {cache_dir}, but cannot set "
                f"aside what is there: renaming it to {aside.name} failed ({e.strerror}): "
                f"{why}; seed where cache_dir is a plain folder the seed owns (e.g. a path "
                "under a volume rather than its mount point), or set at_node_path: false "
                "on the workload"
            ) from None
    else:
        fs.atomic_write_bytes(aside, ABSENT)
    os.mkdir(cache_dir)
    fs.fsync_dir(cache_dir.parent)


def _move(tree: Path, keep: Path) -> None:
    """Move `tree` to `keep`: a rename on one filesystem; else a copy under a temp name
    beside `keep`, renamed into place, and `tree` deleted."""
    try:
        os.rename(tree, keep)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    partial = keep.with_name(f".{keep.name}.partial")
    fs.remove_tree(partial)
    shutil.copytree(tree, partial, symlinks=True)
    os.rename(partial, keep)
    fs.remove_tree(tree)
