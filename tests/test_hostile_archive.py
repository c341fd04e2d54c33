"""Hostile archives at a node that takes unsigned manifests (#20), each pulled by the real
CLI in a fresh process: refused in one line, nothing left in the install workdir, memory
bounded, and the next good manifest installs."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml
import zstandard
from conftest import CLI, WORKLOAD, torchwarm
from factories import Member, hand_archive, tree
from synthetic import publish_synthetic

from torchwarm.formats import Captured
from torchwarm.node.install import workdir
from torchwarm.spec import archive
from torchwarm.stores.local import LocalStore

CACHE = {"fxgraph/entry": b"graph" * 50, "kernels/k.so": b"so" * 99}


class Node:
    """A node with a local store and a cache volume under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = LocalStore(root / "store")
        self.cache_dir = root / "volume" / "inductor"
        self.cache_dir.parent.mkdir(parents=True)
        self.config = root / "node.yaml"
        doc = {"store": self.store.url, "cache_dir": str(self.cache_dir), "workloads": [WORKLOAD]}
        self.config.write_text(yaml.safe_dump(doc))

    def publish(self, blob: Path | None = None) -> None:
        """Publish `blob` as the workload's cachedir archive, or, without one, CACHE."""
        work = self.root / f"capture-{len(list(self.root.glob('capture-*')))}"
        caps = [Captured("cachedir", blob, archive.MEDIA_TYPE)] if blob else None
        publish_synthetic(self.store, work, {} if blob else CACHE, captured=caps)

    def pull(self) -> dict:
        """`torchwarm pull`; the ready marker it wrote."""
        torchwarm("pull", "-c", str(self.config), timeout=120)
        return json.loads((self.cache_dir.parent / "torchwarm-ready.json").read_text())

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in workdir(self.cache_dir).glob("*-*"))


def cold_reason(marker: dict) -> str:
    assert marker["status"] == "cold", marker
    (reason,) = [w["reason"] for w in marker["workloads"]]
    assert "\n" not in reason
    return reason


def test_deep_archive_refused_and_next_good_manifest_installs(tmp_path):
    """An archive of folders 1,000 deep is refused in one line, leaves no staging folder,
    and the next good manifest installs."""
    node = Node(tmp_path)
    deep = [Member("/".join(["d"] * i), type=tarfile.DIRTYPE, mode=0o755) for i in range(1, 1001)]
    node.publish(hand_archive(tmp_path / "deep.tar.zst", deep))
    assert "levels deep" in cold_reason(node.pull())
    assert node.leftovers() == []
    node.publish()
    assert node.pull()["status"] == "warm"
    assert tree(node.cache_dir) == CACHE


def huge_pax_header_archive(path: Path, header_bytes: int) -> Path:
    """A tar+zstd of one file behind a PAX header of `header_bytes` (one comment record):
    a few KB on disk."""
    value = header_bytes - len(f"{header_bytes} comment=\n")
    record_head = f"{header_bytes} comment=".encode()
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, header_bytes
    member = tarfile.TarInfo("fxgraph/entry")
    member.size = 1
    with path.open("wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as zw:
        zw.write(info.tobuf(format=tarfile.USTAR_FORMAT) + record_head)
        chunk = b"x" * (1 << 20)
        for start in range(0, value, len(chunk)):
            zw.write(chunk[: value - start])
        zw.write(b"\n" + b"\0" * (-header_bytes % 512))
        zw.write(member.tobuf(format=tarfile.USTAR_FORMAT) + b"x".ljust(512, b"\0"))
        zw.write(b"\0" * 1024)
    return path


PEAK = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], capture_output=True); " \
       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"  # fmt: skip


def test_huge_pax_header_refused_before_it_is_read(tmp_path):
    """A blob of a few KB holding a 256 MiB PAX header is refused in one line, and no
    process of the pull grows by anything near the header's size."""
    node = Node(tmp_path)
    blob = huge_pax_header_archive(tmp_path / "pax.tar.zst", 256 << 20)
    assert blob.stat().st_size < 64 << 10
    node.publish(blob)
    peak_kib = int(subprocess.check_output([sys.executable, "-c", PEAK, *CLI, "pull", "-c",
                                            str(node.config)], timeout=120))  # fmt: skip
    marker = json.loads((node.cache_dir.parent / "torchwarm-ready.json").read_text())
    assert "extended header" in cold_reason(marker)
    assert peak_kib < 160 << 10, f"peak RSS {peak_kib >> 10} MiB"
    assert node.leftovers() == []


def test_duplicate_member_names_refused(tmp_path):
    """An archive naming one file twice is refused: neither copy is installed."""
    node = Node(tmp_path)
    twice = [Member("fxgraph/entry", b"first"), Member("fxgraph/entry", b"second")]
    node.publish(hand_archive(tmp_path / "twice.tar.zst", twice))
    assert "twice" in cold_reason(node.pull())
    assert not node.cache_dir.exists()
