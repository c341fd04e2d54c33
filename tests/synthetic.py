"""A made-up cache published for this machine's fingerprint, without compiling anything.

For tests and benches about the pull's transfer and install (tests/test_fleet.py,
bench/fleet.py): a tree shaped like a cache dir (FX-graph and AOTAutograd entries,
kernel `.so` files) filled with seeded random bytes, captured as `cachedir` with
torchwarm's own archive writer, and published with torchwarm's own publish. The
fingerprint is read by `torchwarm fingerprint --json` in a new process with the nodes'
environment, so that the manifest is exactly the one those nodes resolve.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from torchwarm import archive
from torchwarm.formats import Captured
from torchwarm.manifest import Manifest
from torchwarm.publish import build_manifest, publish
from torchwarm.stores import Store

# (folder, file count) of a small inductor cache dir, as torch lays it out.
LAYOUT = (("fxgraph/ab/fabc", 4), ("aotautograd/cd/acde", 4), ("3g", 6), ("q6", 6), ("rv", 4))


@dataclass(frozen=True)
class SyntheticCache:
    tree: Path  # the made-up cache dir
    files: dict[str, bytes]  # member name -> content
    manifest: Manifest  # as published (stamped)

    @property
    def blob_size(self) -> int:
        return sum(b.size for b in self.manifest.blobs)


def make_tree(root: Path, total_bytes: int, seed: int = 10) -> dict[str, bytes]:
    """Write about `total_bytes` of random files under `root`; return name -> content."""
    rng = random.Random(seed)
    count = sum(n for _, n in LAYOUT)
    files: dict[str, bytes] = {}
    for folder, n in LAYOUT:
        for _ in range(n):
            name = f"{folder}/{rng.getrandbits(64):016x}{'.so' if '/' not in folder else ''}"
            data = rng.randbytes(max(1, total_bytes // count + rng.randrange(-512, 512)))
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            files[name] = data
    return files


def node_fingerprint(env: dict[str, str]) -> dict:
    """This machine's fingerprint as a node process with `env` reads it."""
    out = subprocess.run(
        [sys.executable, "-m", "torchwarm.cli", "fingerprint", "--json"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    fields: dict = json.loads(out.stdout)["fields"]
    return fields


def publish_synthetic(
    store: Store, workload: str, work: Path, total_bytes: int, env: dict[str, str]
) -> SyntheticCache:
    """Make a tree in `work`, capture it as `cachedir` and publish it for this machine."""
    tree = work / "tree"
    files = make_tree(tree, total_bytes)
    dest = work / "cachedir.tar.zst"
    archive.write(tree, files, dest)
    m, blob_files = build_manifest(
        workload, node_fingerprint(env), "cachedir",
        [Captured("cachedir", dest, archive.MEDIA_TYPE)],
        {"unpacked_bytes": sum(len(d) for d in files.values()), "synthetic": True},
    )  # fmt: skip
    return SyntheticCache(tree, files, publish(store, m, blob_files).manifest)


def installed_files(cache_dir: Path) -> dict[str, bytes]:
    """Every regular file under `cache_dir`, by its path relative to it."""
    return {
        p.relative_to(cache_dir).as_posix(): p.read_bytes()
        for p in sorted(cache_dir.rglob("*"))
        if p.is_file()
    }
