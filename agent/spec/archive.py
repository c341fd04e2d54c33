"""Deterministic, compressed tar archives of cache trees, and a safe extractor.

Writing: members sorted, regular files only, fixed mtime/owner, modes 0644/0755, so the
same tree always gives the same bytes (and the same sha256: re-publishing uploads nothing).
Compression: zstd (measured against gzip in bench/compression.py; see README).

Reading: archives come from an untrusted store. Even after the digest check, extraction
refuses anything but plain files under the target (no absolute paths, '..', links,
devices, setuid bits) and bounds member count and total size (decompression bombs).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import zstandard

from torchwarm.errors import ArchiveError, InstallError

MEDIA_TYPE = "application/x-tar+zstd"
ZSTD_LEVEL = 10  # compress once on the seed, decompress on every node
FIXED_MTIME = 315532800  # 1980-01-01, as zip and reproducible builds use
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_members: int = 200_000
    max_total_bytes: int = 64 << 30
    max_member_bytes: int = 16 << 30


def write(root: Path, members: Iterable[str], dest: Path, level: int = ZSTD_LEVEL) -> None:
    """Write the files `members` (paths relative to `root`) to `dest` as tar+zstd."""
    cctx = zstandard.ZstdCompressor(level=level)
    with dest.open("wb") as raw, cctx.stream_writer(raw, closefd=False) as zw:
        with tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for rel in sorted(set(members)):
                path = root / rel
                st = path.stat()
                info = tarfile.TarInfo(rel)
                info.size = st.st_size
                info.mtime = FIXED_MTIME
                info.mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with path.open("rb") as f:
                    tar.addfile(info, f)
        zw.flush(zstandard.FLUSH_FRAME)


def extract(src: Path, dest: Path, limits: Limits = Limits()) -> list[str]:
    """Extract `src` into the directory `dest`; return the member names written.

    An existing file at a member's path is replaced (unlinked first), never written
    through: `dest` may hold hard links shared with a live cache tree.
    """
    names: list[str] = []
    try:
        for member, rel, tar in _checked(src, limits):
            try:
                if member.isdir():
                    (dest / rel).mkdir(parents=True, exist_ok=True)
                    continue
                fileobj = tar.extractfile(member)
                assert fileobj is not None  # regular file, checked above
                _write_member(dest / rel, fileobj, member.size, member.mode & 0o111 != 0)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise InstallError(
                        f"no space left in {dest} while unpacking {rel!r}; enlarge the cache volume"
                    ) from None
                raise ArchiveError(
                    f"{src.name}: member {rel!r} cannot be written ({e.strerror}); "
                    "the archive clashes with itself or the cache tree"
                ) from None
            names.append(rel)
    except _INVALID as e:  # a member's bytes read here, not in _checked
        raise _invalid(src, e) from None
    return names


def members(src: Path, limits: Limits = Limits()) -> list[str]:
    """The names of the regular files in `src`, checked as extract() checks them; writes
    nothing."""
    return [rel for member, rel, _ in _checked(src, limits) if member.isreg()]


def _checked(src: Path, limits: Limits) -> Iterator[tuple[tarfile.TarInfo, str, tarfile.TarFile]]:
    """Stream `src`'s members, each checked (_check_member) and within `limits`, with its
    safe relative name and the open archive (to read it from, before the next one)."""
    total = count = 0
    try:
        with (
            src.open("rb") as raw,
            zstandard.ZstdDecompressor().stream_reader(raw) as zr,
            tarfile.open(fileobj=zr, mode="r|") as tar,
        ):
            for member in tar:
                rel = _check_member(member, src)
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


_INVALID = (tarfile.TarError, zstandard.ZstdError, EOFError)


def _invalid(src: Path, e: BaseException) -> ArchiveError:
    return ArchiveError(f"{src.name}: not a valid tar+zstd archive ({e})")


def _check_member(member: tarfile.TarInfo, src: Path) -> str:
    name = member.name
    where = f"{src.name}: member {name!r}"
    if not (member.isreg() or member.isdir()):
        kind = "symlink" if member.issym() else "hard link" if member.islnk() else "special file"
        raise ArchiveError(
            f"{where} is a {kind}; only regular files and directories may be installed"
        )
    if "\0" in name:
        raise ArchiveError(f"{src.name}: a member name holds a NUL byte; refusing")
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("/") or ".." in p.parts or not p.parts or "\\" in name:
        raise ArchiveError(f"{where} escapes the target directory; refusing")
    if member.mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX):
        raise ArchiveError(f"{where} has setuid/setgid/sticky bits; refusing")
    return p.as_posix()


def _write_member(path: Path, fileobj: io.BufferedReader, size: int, executable: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()  # break hard links to the previous tree instead of writing through them
    written = 0
    with path.open("xb") as out:
        while chunk := fileobj.read(_CHUNK):
            out.write(chunk)
            written += len(chunk)
    if written != size:
        raise ArchiveError(f"member {path.name!r} is truncated ({written} of {size} bytes)")
    os.chmod(path, 0o755 if executable else 0o644)
