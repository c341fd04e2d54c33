"""The Format interface, and which files of torch's cache dir a capture takes."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from torchwarm.env import compat

if TYPE_CHECKING:
    from torchwarm.config import Workload
    from torchwarm.spec import archive

Blobs = Mapping[str, "Path | archive.Source"]  # a capture's blobs by role


@dataclass(frozen=True)
class Captured:
    role: str  # what the blob is to its format: "cachedir", "megacache", "kernels", "dynamo"
    path: Path
    media_type: str


class Format(Protocol):
    name: str

    def prepare_in_process(self, w: Workload, out_dir: Path) -> None:
        """In the warm-up child, before compiling: set torch up for this capture, or raise
        ConfigError (one line) for a workload the format cannot capture."""
        ...

    def save_in_process(self, w: Workload, out_dir: Path) -> None:
        """In the warm-up child, after compiling: save what only that process can see."""
        ...

    def capture(self, cache_dir: Path, out_dir: Path) -> list[Captured]:
        """After the child has exited: turn its cache dir (and saves) into blob files."""
        ...

    def manifest_fields(self, w: Workload, out_dir: Path) -> dict[str, Any]:
        """Extra fields for the manifest's `warmup` object (docs/format.md), after capture."""
        ...

    def unpacked_bytes(self, cache_dir: Path) -> int:
        """After capture: the bytes this capture's blobs write into a node's cache dir,
        every blob installed (the manifest's `unpacked_bytes`, the free-space check)."""
        ...

    def install(self, blobs: Blobs, staging: Path, *, precompiled: bool = False) -> None:
        """Fill the directory `staging` (the future cache dir) from the blobs: files, or
        streams (node/fetch.py) each read once, in the manifest's order, and verified when
        read to their end (a fill that raises leaves a staging folder to discard).

        `precompiled`: install precompiled Dynamo entries, for formats that carry them
        (precompile.decide() says whether they may be). False leaves them out and removes
        this capture's entries left by an earlier install; other formats ignore it.
        """
        ...


def disable_caching_precompile() -> None:
    """Compile without torch's precompile mode even if TORCH_CACHING_PRECOMPILE=1 is set
    on the seed: its Dynamo entries must travel only in the `precompile` format, which
    checks the model code on the node, and its AOTAutograd keys (a random backend id in
    each) would never hit on a node."""
    compat.set_caching_precompile(False)


def cache_members(cache_dir: Path, suffix: str | None = None, dynamo: bool = False) -> list[str]:
    """Relative paths of the persistent files in a cache dir, optionally only `*suffix`.

    Lock files, torch's in-flight temp files, torchwarm's own files and anything that is
    not a regular file (a symlink, a FIFO) never travel.
    Files under `dynamo/` (precompiled Dynamo entries, which travel only in their own blob
    of the `precompile` format) are left out, or with `dynamo=True` are the only ones.
    """
    out = []
    for dirpath, dirnames, filenames in os.walk(cache_dir):
        rel_dir = Path(dirpath).relative_to(cache_dir)
        if rel_dir == Path("."):
            dirnames[:] = [
                d for d in dirnames if d != compat.LOCKS_DIR and (d == compat.DYNAMO_DIR) == dynamo
            ]
            if dynamo:
                continue  # files at the top level are not Dynamo entries
        for name in filenames:
            if name.endswith(compat.TRANSIENT_SUFFIXES) or name.startswith(".torchwarm"):
                continue
            if suffix is not None and not name.endswith(suffix):
                continue
            try:  # a symlink or a FIFO is no member (a FIFO would block the capture)
                if not stat.S_ISREG(os.lstat(Path(dirpath, name)).st_mode):
                    continue
            except FileNotFoundError:
                continue  # gone since the listing: torch replaced or removed it
            out.append((rel_dir / name).as_posix())
    return sorted(out)


def tree_bytes(cache_dir: Path, members: list[str]) -> int:
    """The size of `members` (paths relative to `cache_dir`) together."""
    return sum((cache_dir / m).stat().st_size for m in members)
