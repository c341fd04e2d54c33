"""The embedded default: a folder on a local or shared filesystem (`file:///path`)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from torchwarm.errors import ObjectNotFound, ObjectTooLarge, StoreError
from torchwarm.stores.base import Capabilities, ObjectInfo, Read, check_key
from torchwarm.util.fs import fsync_dir

_CHUNK = 1 << 20
_TMP_SUFFIX = ".tmp"
_LOCK_NAME = ".torchwarm.lock"


class LocalStore:
    """Objects are files under `root`; every write is temp file + fsync + rename.

    Every write to a folder (put, put_if_version, delete) takes an exclusive flock on that
    folder's `.torchwarm.lock` for its final step only (the rename, link or unlink; the
    bytes are written before), so that put_if_version's compare and swap is atomic
    against every writer of the store, across processes; its create-if-absent
    (version=None) is a hard link, which fails if the name exists.
    On NFS this relies on the server's lock support (Linux maps flock onto NFSv4 locks).
    A version token is `size-n-sha256(first n bytes)`, n = min(size, limit + 1): a content
    digest like S3's ETag, computed without reading more than limit + 1 bytes.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = root.as_uri()
        self.capabilities = Capabilities(writable=True, resumable_download=True, remote=False)

    def _path(self, key: str) -> Path:
        path = self.root / check_key(key)
        if path.name == _LOCK_NAME:
            raise ValueError(f"invalid store key {key!r}: the name of the folder lock")
        return path

    def _open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return path.open("rb")
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(f"{self.url}/{key} does not exist") from None
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}") from e

    def read(self, key: str, limit: int) -> Read:
        with self._open(key) as f:
            data, version = _head(f, limit + 1)
        if len(data) > limit:
            raise ObjectTooLarge(f"{self.url}/{key}", limit, version)
        return Read(data, version)

    def download(
        self, key: str, sink: BinaryIO, *, limit: int | None = None, offset: int = 0
    ) -> int:
        where = f"{self.url}/{key}"
        with self._open(key) as f:
            if limit is not None and (offset > limit or os.fstat(f.fileno()).st_size > limit):
                raise ObjectTooLarge(where, limit)
            f.seek(offset)
            n = offset
            # Never read past limit + 1: a file that grows while it is read is caught too.
            while chunk := f.read(_CHUNK if limit is None else min(_CHUNK, limit + 1 - n)):
                if limit is not None and n + len(chunk) > limit:
                    raise ObjectTooLarge(where, limit)
                sink.write(chunk)
                n += len(chunk)
            return n - offset

    def put(self, key: str, data: bytes | Path) -> None:
        if not isinstance(data, Path):
            self._commit(key, lambda f: f.write(data), _replace)
            return
        with data.open("rb") as src:  # a bad source: OSError, as S3/GCS
            self._commit(key, lambda f: shutil.copyfileobj(src, f, _CHUNK), _replace)

    def put_if_version(self, key: str, data: bytes, version: str | None) -> bool:
        if version is None:
            return self._commit(key, lambda f: f.write(data), _link)

        def swap(tmp: str, target: Path) -> bool:
            try:
                with target.open("rb") as f:
                    current = _head(f, int(version.split("-")[1]))[1]
            except FileNotFoundError:
                return False  # deleted since it was read
            if current != version:
                return False
            os.replace(tmp, target)
            return True

        return self._commit(key, lambda f: f.write(data), swap)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Walk only the deepest folder the prefix names, and below it only the folders
        whose keys can start with the prefix. A folder or file that cannot be read (EACCES,
        ESTALE on NFS) raises StoreError: a listing that skipped it would be short, and gc
        would take the blobs of the manifests it missed for unreferenced."""
        base = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        folders = [base]
        while folders:
            folder = folders.pop()
            for entry in self._scan(folder, prefix):
                key = folder + entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if (key + "/").startswith(prefix):
                            folders.append(key + "/")
                        continue
                    name = entry.name
                    if name == _LOCK_NAME or name.startswith(".") and name.endswith(_TMP_SUFFIX):
                        continue  # the folder lock, or a write in progress
                    if not key.startswith(prefix):
                        continue
                    st = os.stat(entry.path)
                except FileNotFoundError:
                    continue  # deleted since the folder was read
                except OSError as e:
                    raise _unlistable(entry.path, e, f"{self.url}/{prefix}") from e
                if stat.S_ISREG(st.st_mode):
                    yield ObjectInfo(key, st.st_size, st.st_mtime)

    def _scan(self, folder: str, prefix: str) -> list[os.DirEntry[str]]:
        """The entries of the store's `folder` ('' is the root, else it ends in '/'); none
        when it does not exist (never written to, or not a folder)."""
        path = self.root / folder if folder else self.root
        try:
            with os.scandir(path) as entries:
                return list(entries)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise _unlistable(path, e, f"{self.url}/{prefix}") from e

    def touch(self, key: str) -> None:
        try:
            os.utime(self._path(key))
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.url}/{key} does not exist") from None
        except OSError as e:
            raise StoreError(f"cannot touch {self._path(key)}: {e.strerror}") from e

    def delete(self, key: str) -> None:
        target = self._path(key)
        if not target.parent.is_dir():
            return
        try:
            with self._locked(target.parent), contextlib.suppress(FileNotFoundError):
                target.unlink()
        except OSError as e:
            raise StoreError(f"cannot delete {target}: {e.strerror}") from e

    def _commit(
        self, key: str, fill: Callable[[BinaryIO], object], swap: Callable[[str, Path], bool]
    ) -> bool:
        """Write a fsynced temp file beside the target with `fill`, then, holding the
        folder's lock, let `swap(temp, target)` put it in place; return what swap says."""
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=_TMP_SUFFIX, dir=target.parent
            )
            try:
                with os.fdopen(fd, "wb") as f:
                    fill(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                with self._locked(target.parent):
                    done = swap(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        except OSError as e:
            raise StoreError(f"cannot write {target}: {e.strerror}") from e
        if done:
            fsync_dir(target.parent)
        return done

    @contextlib.contextmanager
    def _locked(self, folder: Path) -> Iterator[None]:
        fd = os.open(folder / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes
            yield
        finally:
            os.close(fd)


def _head(f: BinaryIO, n: int) -> tuple[bytes, str]:
    """The first `n` bytes of an open object file, and the version token they give."""
    size = os.fstat(f.fileno()).st_size
    data = f.read(n)
    return data, f"{size}-{len(data)}-{hashlib.sha256(data).hexdigest()}"


def _unlistable(path: str | Path, e: OSError, listing: str) -> StoreError:
    return StoreError(
        f"cannot list {path}: {e.strerror or e}, so the listing of {listing} would be "
        "incomplete: fix the folder's permissions or the mount, then try again"
    )


def _replace(tmp: str, target: Path) -> bool:
    os.replace(tmp, target)
    return True


def _link(tmp: str, target: Path) -> bool:
    try:
        os.link(tmp, target)  # fails with EEXIST if the name exists: exactly one racer wins
    except FileExistsError:
        return False
    return True
