"""What each capture format says of itself for the manifest, on a made-up cache dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchwarm import formats

# A cache dir as torch 2.13 leaves it on CPU, with a precompiled Dynamo entry.
CACHE = {
    "fxgraph/ab/fkey/entry": 3000,
    "aotautograd/akey/entry": 2000,
    "ab/kkey.main.so": 5000,
    "ab/kkey.main.cpp": 700,
    "dynamo/" + "0f" * 32 + "/entry": 9000,
    "locks/fkey.lock": 0,
}


def made_up_cache(root: Path) -> Path:
    for rel, size in CACHE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * size)
    return root


@pytest.mark.parametrize("name", sorted(formats.FORMATS))
def test_the_declared_unpacked_size_covers_what_the_install_writes(name, tmp_path):
    """unpacked_bytes() (the manifest's free-space figure) is at least what installing the
    capture writes, every blob installed: Dynamo entries included."""
    fmt = formats.get(name)
    cache, out, staging = made_up_cache(tmp_path / "cache"), tmp_path / "out", tmp_path / "n"
    out.mkdir()
    staging.mkdir()
    (out / "megacache.bin").write_bytes(b"")  # what a megacache seed saved (nothing here)
    blobs = {c.role: c.path for c in fmt.capture(cache, out)}
    fmt.install(blobs, staging, precompiled=True)
    written = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    assert written > 0
    assert fmt.unpacked_bytes(cache) >= written
