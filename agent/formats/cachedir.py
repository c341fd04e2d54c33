"""`cachedir`: the whole TORCHINDUCTOR_CACHE_DIR (FX graphs, AOTAutograd entries, CPU
kernel `.so` files, Triton kernels) as one deterministic tar+zstd archive.

Needs no torch on the node to install: it is files in, files out.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchwarm.formats.base import (
    Blobs,
    Captured,
    cache_members,
    disable_caching_precompile,
    tree_bytes,
)
from torchwarm.spec import archive

if TYPE_CHECKING:
    from torchwarm.config import Workload


class CacheDirFormat:
    name = "cachedir"

    def prepare_in_process(self, w: Workload, out_dir: Path) -> None:
        disable_caching_precompile()

    def save_in_process(self, w: Workload, out_dir: Path) -> None:
        """Nothing: the files on disk are the whole capture."""

    def capture(self, cache_dir: Path, out_dir: Path) -> list[Captured]:
        dest = out_dir / "cachedir.tar.zst"
        archive.write(cache_dir, cache_members(cache_dir), dest)
        return [Captured("cachedir", dest, archive.MEDIA_TYPE)]

    def manifest_fields(self, w: Workload, out_dir: Path) -> dict[str, Any]:
        return {}

    def unpacked_bytes(self, cache_dir: Path) -> int:
        return tree_bytes(cache_dir, cache_members(cache_dir))

    def install(self, blobs: Blobs, staging: Path, *, precompiled: bool = False) -> None:
        archive.extract(blobs["cachedir"], staging)
