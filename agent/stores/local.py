"""The embedded default: a folder on a local or shared filesystem (`file:///path`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import ObjectNotFound, StoreError
from ..fsutil import atomic_writer, fsync_dir
from .base import ObjectInfo, check_key

_CHUNK = 1 << 20
_TMP_SUFFIX = ".tmp"


class LocalStore:
    """Objects are files under `root`; every write is temp file + fsync + rename."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return path.open("rb")
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(f"{self.url}/{key} does not exist") from None
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}") from e

    def read(self, key: str) -> bytes:
        with self._open(key) as f:
            return f.read()

    def download(self, key: str, sink: BinaryIO) -> int:
        with self._open(key) as f:
            n = 0
            while chunk := f.read(_CHUNK):
                sink.write(chunk)
                n += len(chunk)
            return n

    def put(self, key: str, data: bytes) -> None:
        with self._writing(key) as f:
            f.write(data)

    def put_file(self, key: str, path: Path) -> None:
        with path.open("rb") as src, self._writing(key) as f:  # a bad source: OSError, as S3/GCS
            shutil.copyfileobj(src, f, _CHUNK)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=_TMP_SUFFIX, dir=target.parent
            )
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                # link(2) fails with EEXIST if the name exists: exactly one racer wins.
                os.link(tmp, target)
            finally:
                os.unlink(tmp)
        except FileExistsError:
            return False
        except OSError as e:
            raise StoreError(f"cannot write {target}: {e.strerror}") from e
        fsync_dir(target.parent)
        return True

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # Walk only the deepest directory the prefix names, then filter.
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".") and name.endswith(_TMP_SUFFIX):
                    continue  # a write in progress
                full = Path(dirpath, name)
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        st = full.stat()
                        yield ObjectInfo(key, st.st_size, st.st_mtime)

    def touch(self, key: str) -> None:
        try:
            os.utime(self._path(key))
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.url}/{key} does not exist") from None
        except OSError as e:
            raise StoreError(f"cannot touch {self._path(key)}: {e.strerror}") from e

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    @contextlib.contextmanager
    def _writing(self, key: str) -> Iterator[BinaryIO]:
        target = self._path(key)
        try:
            with atomic_writer(target) as f:
                yield f
        except OSError as e:
            raise StoreError(f"cannot write {target}: {e.strerror}") from e
