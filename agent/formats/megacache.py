"""`megacache`: torch.compiler.save_cache_artifacts() bytes, plus the CPU kernels it lacks.

The mega-cache holds FX-graph and AOTAutograd entries (and, on CUDA, Triton kernels:
inductor's bundle_triton_into_fx_graph_cache is on by default), but not the compiled
C++ `.so` kernels of the CPU backend, so a CPU node given only the mega-cache recompiles
every kernel. The `kernels` blob carries those `.so` files (and torch's ISA-probe
library) beside it. Installing needs torch on the node: load_cache_artifacts() writes
the entries into torch's own layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchwarm.env.torchenv import torch_cache_dir
from torchwarm.errors import ArchiveError
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

MEDIA_TYPE = "application/vnd.pytorch.cache-artifacts"


class MegaCacheFormat:
    name = "megacache"

    def prepare_in_process(self, w: Workload, out_dir: Path) -> None:
        disable_caching_precompile()

    def save_in_process(self, w: Workload, out_dir: Path) -> None:
        import torch

        saved = torch.compiler.save_cache_artifacts()
        data = saved[0] if saved is not None else b""
        (out_dir / "megacache.bin").write_bytes(data)

    def capture(self, cache_dir: Path, out_dir: Path) -> list[Captured]:
        kernels = out_dir / "kernels.tar.zst"
        archive.write(cache_dir, cache_members(cache_dir, suffix=".so"), kernels)
        return [
            Captured("megacache", out_dir / "megacache.bin", MEDIA_TYPE),
            Captured("kernels", kernels, archive.MEDIA_TYPE),
        ]

    def manifest_fields(self, w: Workload, out_dir: Path) -> dict[str, Any]:
        return {}

    def unpacked_bytes(self, cache_dir: Path) -> int:
        """The kernels, plus what load_cache_artifacts() writes: at most the seed's own
        entries, so the whole cache dir (its output code and sources included) bounds it."""
        return tree_bytes(cache_dir, cache_members(cache_dir))

    def install(self, blobs: Blobs, staging: Path, *, precompiled: bool = False) -> None:
        import torch

        archive.extract(blobs["kernels"], staging)
        data = archive.read_whole(blobs["megacache"])
        if not data:
            return
        with torch_cache_dir(staging):
            try:
                info = torch.compiler.load_cache_artifacts(data)
            except Exception as e:  # torch raises assorted types on malformed input
                raise ArchiveError(f"megacache blob could not be loaded by torch: {e}") from None
        if info is None:
            raise ArchiveError("megacache blob was not accepted by this torch (version mismatch?)")
