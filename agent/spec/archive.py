"""Deterministic, compressed tar archives of cache trees, and a safe extractor.

Writing: members sorted, regular files only, fixed mtime/owner, modes 0644/0755, so the
same tree always gives the same bytes (and the same sha256: re-publishing uploads nothing).
Compression: zstd (measured against gzip in bench/compression.py; see README).

Reading: archives come from an untrusted store. Even after the digest check, extraction
refuses anything but plain files under the target (no absolute paths, '..', links,
devices, setuid bits, sparse files, a name used twice) and bounds member count, total
size (decompression bombs), path depth and length (a tree ~1,000 deep breaks every
recursive walk and delete), and extended headers (PAX, GNU long names), which tarfile
reads whole into memory: a 1 GiB PAX header compresses to 33 KB.

The source is a file, or a stream read once (node/fetch.py streams a blob from the store
straight into extract: the caller checks its digest before anything it wrote is used).
Members are written on a few threads while the archive is read on, with at most
_WRITE_BUDGET bytes read and not yet written: creating a file costs far more than its
bytes on some volumes (bench/scale.py).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

import zstandard

from torchwarm.errors import ArchiveError, InstallError

MEDIA_TYPE = "application/x-tar+zstd"
ZSTD_LEVEL = 10  # compress once on the seed, decompress on every node
FIXED_MTIME = 315532800  # 1980-01-01, as zip and reproducible builds use
_CHUNK = 1 << 20
_WRITERS = 4  # threads writing members (a 1,500-file tree: 1.3 s against 1.6 s for one)
_WRITE_BUDGET = 4 << 20  # bytes read from the archive and not yet written (a few members)
_INLINE = 1 << 20  # members up to this size are read whole and written by a writer thread


class Source(Protocol):
    """An archive to read once, front to back (a blob streamed from the store)."""

    name: str  # for messages

    def open(self) -> AbstractContextManager[BinaryIO]: ...


Check = Callable[[str], None]  # raises ArchiveError for a regular member's name it refuses


@dataclass(frozen=True)
class Limits:
    max_members: int = 200_000
    max_total_bytes: int = 64 << 30
    max_member_bytes: int = 16 << 30
    max_depth: int = 64  # path components (a cache dir is a handful deep)
    max_path_bytes: int = 1024  # of a member name; PATH_MAX (4096) must hold cache_dir too
    max_header_bytes: int = 64 << 10  # one PAX or GNU long-name header (ours: a name)


# A member has at most a global PAX header, its own, and GNU long name and link headers;
# tarfile follows a chain of them by recursion.
_MAX_HEADER_CHAIN = 4
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
             tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)  # fmt: skip


def write(root: Path, members: Iterable[str], dest: Path, level: int = ZSTD_LEVEL) -> None:
    """Write the files `members` (paths relative to `root`) to `dest` as tar+zstd."""
    cctx = zstandard.ZstdCompressor(level=level)
    with dest.open("wb") as raw, cctx.stream_writer(raw, closefd=False) as zw:
        with tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for rel in sorted(set(members)):
                with _open_beneath(root, rel) as f:
                    st = os.fstat(f.fileno())
                    info = tarfile.TarInfo(rel)
                    info.size = st.st_size
                    info.mtime = FIXED_MTIME
                    info.mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, f)
        zw.flush(zstandard.FLUSH_FRAME)


def _open_beneath(root: Path, rel: str) -> BinaryIO:
    """Open the regular file `root/rel` for reading without following a symlink at any
    component: the tree may be written meanwhile by a process that is not trusted with
    what the capturer can read (an app beside the sidecar that holds the node key), and
    a member or folder swapped for a link after the listing must not bring its target
    into the archive. OSError (ELOOP, ENOTDIR, or "not a regular file") otherwise."""
    parts = PurePosixPath(rel).parts
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)  # fmt: skip
            os.close(fd)
            fd = sub
        # O_NONBLOCK: a FIFO put there opens at once (and is refused below), not never.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        leaf = os.open(parts[-1], flags, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(leaf).st_mode):
        os.close(leaf)
        raise OSError(errno.EINVAL, "not a regular file", str(root / rel))
    return os.fdopen(leaf, "rb")


def extract(
    src: Path | Source, dest: Path, limits: Limits = Limits(), check: Check | None = None
) -> list[str]:
    """Extract `src` into the directory `dest`; return the member names written.

    `check(name)`, if given, runs for every regular member before it is written. An
    existing file at a member's path is replaced (unlinked first), never written through:
    `dest` may hold hard links shared with a live cache tree.
    """
    names: list[str] = []
    made: set[Path] = {dest}
    writers = _Writers(src, dest, _WRITERS, _WRITE_BUDGET)
    try:
        # Inside the source's open(): what goes wrong here is what a stream's open()
        # sees, to check its digest before blaming the archive (node/fetch.py).
        with _open(src) as raw:
            try:
                for member, rel, tar in _checked(raw, src, limits):
                    _extract_member(member, rel, tar, src, dest, check, made, writers)
                    names.append(rel)
                writers.close()
            except _INVALID as e:  # a member's bytes read here, not in _checked
                raise _invalid(src, e) from None
    finally:
        writers.shutdown()
    return names


def _extract_member(member: tarfile.TarInfo, rel: str, tar: tarfile.TarFile, src: Path | Source,
                    dest: Path, check: Check | None, made: set[Path],
                    writers: _Writers) -> None:  # fmt: skip
    path = dest / rel
    try:
        if member.isdir():
            _mkdirs(path, made)
            return
        if check is not None:
            check(rel)
        _mkdirs(path.parent, made)
        fileobj = tar.extractfile(member)
        assert fileobj is not None  # regular file, checked above
        executable = member.mode & 0o111 != 0
        if member.size <= _INLINE:
            data = fileobj.read()
            writers.submit(rel, lambda: _write_member(path, data, len(data), executable),
                           len(data))  # fmt: skip
        else:  # large: written here, in chunks, while the writers go on
            _write_member(path, fileobj, member.size, executable)
    except OSError as e:
        raise _unwritable(src, dest, rel, e) from None


def _mkdirs(path: Path, made: set[Path]) -> None:
    if path not in made:
        path.mkdir(parents=True, exist_ok=True)
        made.add(path)


def _unwritable(src: Path | Source, dest: Path, rel: str, e: OSError) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return InstallError(
            f"no space left in {dest} while unpacking {rel!r}; enlarge the cache volume"
        )
    return ArchiveError(
        f"{src.name}: member {rel!r} cannot be written ({e.strerror}); "
        "the archive clashes with itself or the cache tree"
    )


class _Writers:
    """A few threads writing members' files, fed in archive order, holding at most
    `budget` bytes not yet written (a member larger than it waits for the others). The
    first error is raised by the next submit or by close."""

    def __init__(self, src: Path | Source, dest: Path, threads: int, budget: int) -> None:
        self._src, self._dest = src, dest
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="torchwarm-write")
        self._budget = budget
        self._held = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None

    def submit(self, rel: str, write: Callable[[], None], size: int) -> None:
        with self._cond:
            while self._held and self._held + size > self._budget and self._error is None:
                self._cond.wait()
            self._raise()
            self._held += size
        self._pool.submit(self._run, rel, write, size)

    def _run(self, rel: str, write: Callable[[], None], size: int) -> None:
        try:
            if self._error is None:
                write()
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread
            with self._cond:
                if self._error is None:
                    self._error = (
                        _unwritable(self._src, self._dest, rel, e) if isinstance(e, OSError) else e
                    )
        finally:
            with self._cond:
                self._held -= size
                self._cond.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait for every write; raise the first error."""
        self._pool.shutdown(wait=True)
        with self._cond:
            self._raise()

    def shutdown(self) -> None:
        """Stop: what is queued is dropped, what is running finishes."""
        with self._cond:
            if self._error is None:
                self._error = _Stopped()
            self._cond.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Stopped(Exception):
    """The extraction stopped (an error elsewhere): queued writes are skipped."""


def members(src: Path | Source, limits: Limits = Limits(), check: Check | None = None) -> list[str]:
    """The names of the regular files in `src`, checked as extract() checks them (and by
    `check`); writes nothing."""
    names = []
    with _open(src) as raw:
        for member, rel, _ in _checked(raw, src, limits):
            if member.isreg():
                if check is not None:
                    check(rel)
                names.append(rel)
    return names


def read_whole(src: Path | Source) -> bytes:
    """All the bytes of a blob that is not an archive (megacache's), read once."""
    with _open(src) as f:
        return f.read()


def _open(src: Path | Source) -> AbstractContextManager[BinaryIO]:
    return src.open("rb") if isinstance(src, Path) else src.open()


def _checked(
    raw: BinaryIO, src: Path | Source, limits: Limits
) -> Iterator[tuple[tarfile.TarInfo, str, tarfile.TarFile]]:
    """Stream the members of `raw` (`src`, opened), each checked (_check_member) and
    within `limits`, with its safe relative name and the open archive (to read it from,
    before the next one)."""
    total = count = 0
    seen: set[bytes] = set()  # digests of the names so far: 200,000 long names stay small
    try:
        with (
            zstandard.ZstdDecompressor().stream_reader(raw, read_size=_CHUNK, closefd=False) as zr,
            tarfile.open(fileobj=zr, mode="r|", tarinfo=_bounded_info(src, limits)) as tar,
        ):
            while (member := tar.next()) is not None:
                tar.members.clear()  # a stream needs no index of what it has passed
                rel = _check_member(member, src, limits)
                key = hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=16)
                if key.digest() in seen:
                    raise ArchiveError(
                        f"{src.name}: member {_shown(rel)!r} appears twice; refusing, since "
                        "one would silently replace the other"
                    )
                seen.add(key.digest())
                count += 1
                if count > limits.max_members:
                    raise ArchiveError(
                        f"{src.name}: more than {limits.max_members} members; refusing"
                    )
                total += member.size
                if member.size > limits.max_member_bytes or total > limits.max_total_bytes:
                    raise ArchiveError(
                        f"{src.name}: uncompressed size exceeds the limit "
                        f"({limits.max_total_bytes} bytes in all); refusing"
                    )
                yield member, rel, tar
    except _INVALID as e:
        raise _invalid(src, e) from None


def _bounded_info(src: Path, limits: Limits) -> type[tarfile.TarInfo]:
    """A TarInfo class for reading `src` that refuses, before tarfile reads any of it, an
    extended header over `limits.max_header_bytes`, a chain of more than
    _MAX_HEADER_CHAIN of them, and sparse members (whose maps are unbounded headers too).

    tarfile offers no limit of its own; these are its per-member hooks (the same in 3.10 to
    3.13), called with only the 512-byte header block read.
    """
    chain = 0

    def refuse_sparse(*_args: object) -> None:
        raise ArchiveError(f"{src.name}: holds a sparse file; only plain files may be installed")

    class Info(tarfile.TarInfo):
        def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
            nonlocal chain
            if self.type not in _EXTENDED:
                chain = 0
                return super()._proc_member(tar)  # type: ignore[misc]
            chain += 1
            if self.size > limits.max_header_bytes:
                raise ArchiveError(
                    f"{src.name}: an extended header of {self.size} bytes (over "
                    f"{limits.max_header_bytes}); refusing"
                )
            if chain > _MAX_HEADER_CHAIN:
                raise ArchiveError(
                    f"{src.name}: more than {_MAX_HEADER_CHAIN} extended headers in a row; refusing"
                )
            return super()._proc_member(tar)  # type: ignore[misc]

        _proc_sparse = _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = refuse_sparse

    return Info


_INVALID = (tarfile.TarError, zstandard.ZstdError, EOFError)
# What reading a malformed archive raises, inside a Source's open() or out of extract.
MALFORMED: tuple[type[Exception], ...] = (ArchiveError, *_INVALID)


def _invalid(src: Path, e: BaseException) -> ArchiveError:
    return ArchiveError(f"{src.name}: not a valid tar+zstd archive ({e})")


def _check_member(member: tarfile.TarInfo, src: Path, limits: Limits) -> str:
    name = member.name
    where = f"{src.name}: member {_shown(name)!r}"
    if not (member.isreg() or member.isdir()):
        kind = "symlink" if member.issym() else "hard link" if member.islnk() else "special file"
        raise ArchiveError(
            f"{where} is a {kind}; only regular files and directories may be installed"
        )
    if member.issparse():  # the hooks of _bounded_info refuse every kind; this one is cheap
        raise ArchiveError(f"{where} is a sparse file; only plain files may be installed")
    if "\0" in name:
        raise ArchiveError(f"{src.name}: a member name holds a NUL byte; refusing")
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("/") or ".." in p.parts or not p.parts or "\\" in name:
        raise ArchiveError(f"{where} escapes the target directory; refusing")
    if len(p.parts) > limits.max_depth:
        raise ArchiveError(
            f"{where} is {len(p.parts)} levels deep (at most {limits.max_depth}); refusing"
        )
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > limits.max_path_bytes:
        raise ArchiveError(
            f"{where}: its name is {size} bytes long (at most {limits.max_path_bytes}); refusing"
        )
    if member.mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX):
        raise ArchiveError(f"{where} has setuid/setgid/sticky bits; refusing")
    return p.as_posix()


def _shown(name: str) -> str:
    """`name` cut to a length that keeps an error message one readable line."""
    return name if len(name) <= 80 else f"{name[:40]}...{name[-20:]}"


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _write_member(path: Path, data: bytes | BinaryIO, size: int, executable: bool) -> None:
    """Create `path` (its folder exists) with `data` (bytes, or a file to copy `size`
    bytes from), mode 0755 or 0644 whatever the umask."""
    try:
        fd = os.open(path, _CREATE, 0o600)
    except FileExistsError:  # break hard links to the previous tree, never write through
        os.unlink(path)
        fd = os.open(path, _CREATE, 0o600)
    with os.fdopen(fd, "wb", buffering=0) as out:
        if isinstance(data, bytes):
            written = out.write(data) if data else 0
            while written < len(data):
                written += out.write(memoryview(data)[written:])
        else:
            written = 0
            while chunk := data.read(_CHUNK):
                out.write(chunk)
                written += len(chunk)
        if written != size:
            raise ArchiveError(f"member {path.name!r} is truncated ({written} of {size} bytes)")
        os.fchmod(fd, 0o755 if executable else 0o644)
