"""archive.write is deterministic; archive.extract refuses anything but plain files under dest."""

from __future__ import annotations

import dataclasses
import os
import stat
import tarfile

import pytest
from factories import Member, hand_archive, make_tree, read_tree

from torchwarm.errors import ArchiveError
from torchwarm.spec import archive

FILES = {
    "fxgraph/ab/entry": b"graph" * 100,
    "aotautograd/cd/entry": b"autograd",
    "kernels/k.so": b"\x7fELF" + bytes(range(256)),
    "empty": b"",
}


def write(root, dest, members=None):
    archive.write(root, members if members is not None else list(FILES), dest)
    return dest


def extract_error(path, dest, limits=None) -> str:
    """The one-line message of the ArchiveError extracting `path` raises."""
    dest.mkdir(exist_ok=True)
    with pytest.raises(ArchiveError) as e:
        archive.extract(path, dest, limits or archive.Limits())
    assert "\n" not in str(e.value)
    return str(e.value)


def test_same_tree_same_bytes_despite_mtimes(tmp_path):
    """Two copies of one tree with different mtimes and member order give identical archives."""
    a = make_tree(tmp_path / "a", FILES, mtime=1_000_000)
    b = make_tree(tmp_path / "b", FILES, mtime=1_700_000_000)
    write(a, tmp_path / "a.tar.zst")
    write(b, tmp_path / "b.tar.zst", list(reversed(list(FILES))))
    assert (tmp_path / "a.tar.zst").read_bytes() == (tmp_path / "b.tar.zst").read_bytes()


def test_file_mode_beyond_exec_bit_does_not_change_bytes(tmp_path):
    """Permission bits other than the owner's exec bit do not reach the archive."""
    a = make_tree(tmp_path / "a", FILES)
    b = make_tree(tmp_path / "b", FILES)
    os.chmod(b / "empty", 0o600)
    assert write(a, tmp_path / "a.tzst").read_bytes() == write(b, tmp_path / "b.tzst").read_bytes()


def test_round_trip(tmp_path):
    """extract gives back every member's bytes, and returns the member names."""
    src = make_tree(tmp_path / "src", FILES)
    os.chmod(src / "kernels/k.so", 0o755)
    dest = tmp_path / "dest"
    dest.mkdir()
    names = archive.extract(write(src, tmp_path / "a.tzst"), dest)
    assert sorted(names) == sorted(FILES)
    got = read_tree(dest)
    assert {k: v[0] for k, v in got.items()} == FILES
    assert got["kernels/k.so"][1] == 0o755
    assert got["empty"][1] == 0o644


def test_only_listed_members_are_written(tmp_path):
    """Files under root that are not in `members` stay out of the archive."""
    src = make_tree(tmp_path / "src", {**FILES, "locks/x.lock": b"l"})
    dest = tmp_path / "dest"
    dest.mkdir()
    assert "locks/x.lock" not in archive.extract(write(src, tmp_path / "a.tzst"), dest)


def test_hand_made_plain_archive_extracts(tmp_path):
    """The hand_archive factory makes archives extract accepts (so refusals below are real)."""
    path = hand_archive(tmp_path / "ok.tzst", [Member("a/b", b"hi")])
    dest = tmp_path / "dest"
    dest.mkdir()
    assert archive.extract(path, dest) == ["a/b"]
    assert (dest / "a/b").read_bytes() == b"hi"


@pytest.mark.parametrize(
    "member, words",
    [
        (Member("{tmp}/escaped"), "escapes the target"),  # absolute, inside tmp_path
        (Member("../outside"), "escapes the target"),
        (Member("a/../../outside"), "escapes the target"),
        (Member("a\\..\\outside"), "escapes the target"),
        (Member("link", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "is a symlink"),
        (Member("hard", type=tarfile.LNKTYPE, linkname="a"), "is a hard link"),
        (Member("fifo", type=tarfile.FIFOTYPE), "special file"),
        (Member("dev", type=tarfile.CHRTYPE, extra={"devmajor": 1, "devminor": 3}), "special"),
        (Member("blk", type=tarfile.BLKTYPE), "special file"),
        (Member("suid", mode=0o4755), "setuid"),
        (Member("sgid", mode=0o2755), "setuid"),
        (Member("dir", type=tarfile.DIRTYPE, mode=0o1777), "setuid"),
    ],
    ids=lambda x: x.name if isinstance(x, Member) else "",
)
def test_hostile_member_refused(tmp_path, member, words):
    """A member that is not a plain file or folder inside dest is refused, and nothing escapes."""
    member = dataclasses.replace(member, name=member.name.format(tmp=tmp_path))
    path = hand_archive(tmp_path / "bad.tzst", [Member("a", b"first"), member])
    dest = tmp_path / "sub" / "dest"
    dest.parent.mkdir()
    assert words in extract_error(path, dest)
    assert sorted(os.listdir(tmp_path)) == ["bad.tzst", "sub"]
    assert os.listdir(tmp_path / "sub") == ["dest"]
    for p in dest.rglob("*"):
        assert not p.is_symlink()
        assert stat.S_ISREG(p.lstat().st_mode) or p.is_dir()


def test_too_many_members_refused(tmp_path):
    """More members than Limits.max_members is refused."""
    path = hand_archive(tmp_path / "a.tzst", [Member(f"f{i}") for i in range(3)])
    assert "more than 2 members" in extract_error(path, tmp_path / "d", archive.Limits(2))


def test_directory_members_count_towards_limit(tmp_path):
    """Directory entries count towards Limits.max_members (a million empty folders is a bomb)."""
    members = [Member(f"d{i}", type=tarfile.DIRTYPE, mode=0o755) for i in range(3)]
    path = hand_archive(tmp_path / "a.tzst", members)
    assert "more than 2 members" in extract_error(path, tmp_path / "d", archive.Limits(2))


def test_too_large_total_refused(tmp_path):
    """An uncompressed total over Limits.max_total_bytes is refused."""
    path = hand_archive(tmp_path / "a.tzst", [Member("a", b"x" * 8), Member("b", b"y" * 8)])
    limits = archive.Limits(max_total_bytes=10)
    assert "exceeds the limit" in extract_error(path, tmp_path / "d", limits)


def test_too_large_member_refused(tmp_path):
    """One member over Limits.max_member_bytes is refused before it is written."""
    path = hand_archive(tmp_path / "a.tzst", [Member("big", b"x" * 100)])
    dest = tmp_path / "d"
    assert "exceeds" in extract_error(path, dest, archive.Limits(max_member_bytes=50))
    assert not (dest / "big").exists()


def test_truncated_archive_refused(tmp_path):
    """An archive cut in the middle of a member's data is an ArchiveError."""
    src = make_tree(tmp_path / "src", {"blob": os.urandom(200_000)})
    path = write(src, tmp_path / "a.tzst", ["blob"])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    extract_error(path, tmp_path / "d")


def test_garbage_refused(tmp_path):
    """Bytes that are not zstd at all are an ArchiveError naming the file."""
    path = tmp_path / "junk.tzst"
    path.write_bytes(b"this is not an archive" * 100)
    assert "junk.tzst: not a valid tar+zstd archive" in extract_error(path, tmp_path / "d")


def test_zstd_of_garbage_refused(tmp_path):
    """Valid zstd around bytes that are not a tar is an ArchiveError."""
    import zstandard

    path = tmp_path / "junk.tzst"
    path.write_bytes(zstandard.ZstdCompressor().compress(os.urandom(4096)))
    extract_error(path, tmp_path / "d")


def test_file_then_file_beneath_it_refused(tmp_path):
    """A member 'x' followed by 'x/y' is an ArchiveError, not an OSError."""
    path = hand_archive(tmp_path / "a.tzst", [Member("x"), Member("x/y")])
    extract_error(path, tmp_path / "d")


def test_file_over_existing_folder_refused(tmp_path):
    """A file member whose path is a folder in dest is an ArchiveError, not an OSError."""
    path = hand_archive(tmp_path / "a.tzst", [Member("x")])
    dest = tmp_path / "d"
    (dest / "x").mkdir(parents=True)
    extract_error(path, dest)


def test_extract_replaces_hard_link_without_writing_through(tmp_path):
    """Extracting over a file hard-linked elsewhere replaces it; the other link keeps its bytes."""
    live = make_tree(tmp_path / "live", {"fxgraph/entry": b"old"})
    dest = tmp_path / "staging"
    (dest / "fxgraph").mkdir(parents=True)
    os.link(live / "fxgraph/entry", dest / "fxgraph/entry")
    path = hand_archive(tmp_path / "a.tzst", [Member("fxgraph/entry", b"new")])
    archive.extract(path, dest)
    assert (dest / "fxgraph/entry").read_bytes() == b"new"
    assert (live / "fxgraph/entry").read_bytes() == b"old"
    assert (live / "fxgraph/entry").stat().st_nlink == 1


def test_extract_replaces_symlink_without_following_it(tmp_path):
    """A symlink already in dest is replaced by the member, not written through."""
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "f").symlink_to(target)
    archive.extract(hand_archive(tmp_path / "a.tzst", [Member("f", b"new")]), dest)
    assert not (dest / "f").is_symlink()
    assert target.read_bytes() == b"keep"


# -- hostile structure (#20): depth, name length, extended headers, duplicate names ------


def raw_archive(path, blocks: list[bytes]):
    """A tar+zstd made of raw tar bytes (headers the tarfile writer will not produce)."""
    import zstandard

    path.write_bytes(zstandard.ZstdCompressor().compress(b"".join(blocks) + b"\0" * 1024))
    return path


def header(name: str, kind: bytes, size: int) -> bytes:
    """One 512-byte ustar header block."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def pax_record(keyword: str, value: str) -> bytes:
    """One PAX record, "LEN keyword=value\\n", LEN counting itself."""
    body = f" {keyword}={value}\n"
    n = len(body) + 1
    while len(f"{n}{body}") != n:
        n += 1
    return f"{n}{body}".encode()


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def test_too_deep_member_refused(tmp_path):
    """A member more folders deep than Limits.max_depth is refused in one line."""
    name = "/".join(["d"] * 1000) + "/f"
    path = hand_archive(tmp_path / "a.tzst", [Member(name)])
    assert "levels deep" in extract_error(path, tmp_path / "d")
    assert not (tmp_path / "d" / "d").exists()


def test_too_long_member_name_refused(tmp_path):
    """A member name longer than Limits.max_path_bytes is refused before anything is written."""
    name = "/".join(["n" * 200] * 8)
    path = hand_archive(tmp_path / "a.tzst", [Member(name)])
    assert "name is" in extract_error(path, tmp_path / "d")
    assert os.listdir(tmp_path / "d") == []


def test_huge_pax_header_refused(tmp_path):
    """A PAX header over Limits.max_header_bytes is refused (tarfile would read it whole)."""
    member = Member("f", extra={"pax_headers": {"comment": "x" * (1 << 20)}})
    path = hand_archive(tmp_path / "a.tzst", [member])
    assert "extended header" in extract_error(path, tmp_path / "d")


def test_huge_gnu_long_name_refused(tmp_path):
    """A GNU long-name header over Limits.max_header_bytes is refused before it is read."""
    blocks = [header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 1 << 20), b"n" * (1 << 20)]
    path = raw_archive(tmp_path / "a.tzst", [*blocks, header("f", tarfile.REGTYPE, 0)])
    assert "extended header" in extract_error(path, tmp_path / "d")


def test_chain_of_extended_headers_refused(tmp_path):
    """Thousands of PAX headers in a row (tarfile follows them by recursion) are refused."""
    record = padded(pax_record("comment", "x"))
    chain = [header("././@PaxHeader", tarfile.XHDTYPE, 512) + record for _ in range(3000)]
    path = raw_archive(tmp_path / "a.tzst", [*chain, header("f", tarfile.REGTYPE, 0)])
    assert "extended headers in a row" in extract_error(path, tmp_path / "d")


PAX_SPARSE = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s",
              "GNU.sparse.realsize": "1"}  # fmt: skip


@pytest.mark.parametrize(
    "member",
    [
        Member("s", type=tarfile.GNUTYPE_SPARSE),
        Member("s", b"1\n0\n1\n".ljust(512, b"\0") + b"x", extra={"pax_headers": PAX_SPARSE}),
    ],
    ids=["gnu", "pax-1.0"],
)
def test_sparse_member_refused(tmp_path, member):
    """A sparse member (its map is an unbounded header) is refused, whatever its flavour."""
    path = hand_archive(tmp_path / "a.tzst", [member])
    assert "sparse" in extract_error(path, tmp_path / "d")


@pytest.mark.parametrize(
    "first, second",
    [
        (Member("a/f", b"one"), Member("a/f", b"two")),
        (Member("a/f"), Member("a//f")),
        (Member("a/f"), Member("./a/f")),
        (Member("a/f"), Member("a/f", type=tarfile.DIRTYPE, mode=0o755)),
        (Member("a/f", type=tarfile.DIRTYPE, mode=0o755), Member("a/f")),
    ],
    ids=["file-file", "double-slash", "dot", "file-dir", "dir-file"],
)
def test_duplicate_member_names_refused(tmp_path, first, second):
    """Two members with one path (after normalising it) are refused: neither may win."""
    path = hand_archive(tmp_path / "a.tzst", [first, second])
    assert "twice" in extract_error(path, tmp_path / "d")
    with pytest.raises(ArchiveError, match="twice"):
        archive.members(path)


@pytest.mark.parametrize("swapped", ["fxgraph/ab/entry", "fxgraph/ab"])
def test_write_never_follows_a_link_that_replaced_a_member(tmp_path, swapped):
    """A member (or a folder above it) swapped for a symlink after the listing, as an app
    sharing the cache dir could do to a sidecar that captures it, fails the capture
    instead of archiving what the link points at (a secret of the capturer's)."""
    secret = tmp_path / "node-1.secret"
    secret.write_bytes(b"the node key")
    root = make_tree(tmp_path / "cache", {"fxgraph/ab/entry": b"graph"})
    members = ["fxgraph/ab/entry"]  # listed while it was a regular file
    target = root / swapped
    if target.is_dir():
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "entry").symlink_to(secret)
        os.rename(target, tmp_path / "moved")
        target.symlink_to(tmp_path / "elsewhere")
    else:
        target.unlink()
        target.symlink_to(secret)
    dest = tmp_path / "out.tar.zst"
    with pytest.raises(OSError, match="symbolic link|Not a directory|not a regular file"):
        archive.write(root, members, dest)


def test_cache_members_leave_out_what_is_not_a_regular_file(tmp_path):
    """A FIFO or a symlink in a cache dir is no member: a FIFO opened for reading would
    block the capture until a writer came, a link would bring in its target."""
    from torchwarm.formats.base import cache_members

    root = make_tree(tmp_path / "cache", {"fxgraph/ab/entry": b"graph"})
    os.mkfifo(root / "fxgraph" / "ab" / "pipe")
    (root / "fxgraph" / "link").symlink_to(tmp_path)
    assert cache_members(root) == ["fxgraph/ab/entry"]
