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

from factories import make_tree

from torchwarm.env import fingerprint
from torchwarm.formats import Captured
from torchwarm.seed.publish import build_manifest, publish
from torchwarm.spec import archive
from torchwarm.spec.manifest import Manifest
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


def random_files(total_bytes: int, seed: int = 10) -> dict[str, bytes]:
    """About `total_bytes` of seeded random files laid out like a cache dir: name -> bytes."""
    rng = random.Random(seed)
    count = sum(n for _, n in LAYOUT)
    files: dict[str, bytes] = {}
    for folder, n in LAYOUT:
        for _ in range(n):
            name = f"{folder}/{rng.getrandbits(64):016x}{'.so' if '/' not in folder else ''}"
            files[name] = rng.randbytes(max(1, total_bytes // count + rng.randrange(-512, 512)))
    return files


def capture(work: Path, files: dict[str, bytes]) -> list[Captured]:
    """`files` written under `work/tree` and captured as `cachedir` (what a pull installs)."""
    tree = make_tree(work / "tree", files)
    dest = work / "cachedir.tar.zst"
    archive.write(tree, sorted(files), dest)
    return [Captured("cachedir", dest, archive.MEDIA_TYPE)]


def node_fingerprint(env: dict[str, str] | None = None) -> dict:
    """This machine's fingerprint as a node reads it: in this process, or, given the
    nodes' `env`, in a new process with it."""
    if env is None:
        return fingerprint.collect()
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
    store: Store,
    work: Path,
    files: dict[str, bytes],
    workload: str = "mlp",
    env: dict[str, str] | None = None,
    unpacked: bool = True,
    captured: list[Captured] | None = None,
) -> SyntheticCache:
    """Capture `files` (or publish `captured` as is) for this machine's fingerprint."""
    caps = captured or capture(work, files)
    summary = {"synthetic": True}
    if unpacked:
        summary["unpacked_bytes"] = sum(len(d) for d in files.values())  # type: ignore[assignment]
    m, blob_files = build_manifest(workload, node_fingerprint(env), "cachedir", caps, summary)
    return SyntheticCache(work / "tree", files, publish(store, m, blob_files).manifest)
