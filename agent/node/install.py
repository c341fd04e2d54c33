"""Install a new cache tree into the cache directory all at once, or not at all.

The new tree is built in a staging folder beside the cache dir (same filesystem):
first hard links to the files already there (so earlier entries survive), then the
verified blobs are unpacked on top (replacing files, never writing through links),
then everything is fsynced and the staging folder is swapped in with one rename:
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
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from torchwarm.errors import InstallError
from torchwarm.util.fs import fsync_dir, fsync_tree

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def workdir(cache_dir: Path) -> Path:
    """torchwarm's private folder beside the cache dir: staging trees, downloads, scratch."""
    return cache_dir.parent / f".{cache_dir.name}.torchwarm"


@contextlib.contextmanager
def locked(cache_dir: Path) -> Iterator[Path]:
    """Serialise installers of one cache dir, repair an interrupted swap, yield the workdir."""
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


def install(
    cache_dir: Path,
    fill: Callable[[Path], None],
    before_swap: Callable[[Path], None] = lambda staging: None,
    after_swap: Callable[[], None] = lambda: None,
) -> None:
    """Build the new tree with `fill(staging)` and swap it in atomically.

    Call inside `locked(cache_dir)`. If `fill` raises, the cache dir is untouched.
    `before_swap(staging)` runs last before the swap, on the complete tree: if it raises
    (the deadline passed), the swap does not happen. The swap is the commit point:
    `after_swap()` runs right after it (the new tree in place, its rename on disk), and
    only then is the previous tree deleted; a process stopped before that leaves it to
    the next `locked` (`_recover`).
    """
    work = workdir(cache_dir)
    staging = work / f"staging-{os.getpid()}"
    _rmtree(staging)
    try:
        staging.mkdir()
        if cache_dir.exists():
            _link_tree(cache_dir, staging)
        fill(staging)
        fsync_tree(staging)
    except OSError as e:
        _rmtree(staging)
        raise InstallError(f"cannot build the new cache tree in {staging}: {e}") from None
    except BaseException:
        _rmtree(staging)
        raise
    try:
        before_swap(staging)
        previous = _swap(staging, cache_dir, work)
    except BaseException:
        _rmtree(staging)
        raise
    try:
        after_swap()
    finally:
        if previous is not None:
            _rmtree(previous)


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
    """Undo what a killed installer left: restore a moved-away tree, drop staging folders."""
    previous = sorted(work.glob("previous-*"), key=lambda p: p.stat().st_mtime)
    if previous and not cache_dir.exists():
        os.rename(previous.pop(), cache_dir)
        fsync_dir(cache_dir.parent)
    for leftover in [*previous, *work.glob("staging-*"), *work.glob("downloads-*")]:
        _rmtree(leftover)


def _link_tree(src: Path, dest: Path) -> None:
    """Recreate `src` under `dest` with hard links (copies where links are not possible)."""
    for dirpath, _dirs, files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            s, d = Path(dirpath, name), dest / rel / name
            if s.is_symlink():
                continue
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
