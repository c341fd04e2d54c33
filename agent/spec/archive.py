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
"""

from __future__ import annotations

import errno
import hashlib
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
    seen: set[bytes] = set()  # digests of the names so far: 200,000 long names stay small
    try:
        with (
            src.open("rb") as raw,
            zstandard.ZstdDecompressor().stream_reader(raw) as zr,
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
