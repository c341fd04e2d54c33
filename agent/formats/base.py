"""The Format interface, and what counts as transient in torch's cache dir."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Captured:
    role: str  # what the blob is to its format: "cachedir", "megacache", "kernels"
    path: Path
    media_type: str


class Format(Protocol):
    name: str

    def save_in_process(self, out_dir: Path) -> None:
        """In the warm-up child, after compiling: save what only that process can see."""
        ...

    def capture(self, cache_dir: Path, out_dir: Path) -> list[Captured]:
        """After the child has exited: turn its cache dir (and saves) into blob files."""
        ...

    def install(self, blobs: dict[str, Path], staging: Path) -> None:
        """Fill the directory `staging` (the future cache dir) from verified blob files."""
        ...


# Lock files, torch's in-flight temp files (write_atomic: "<name>.<pid>.<tid>.tmp") and
# torchwarm's own files never travel.
_TRANSIENT_DIRS = {"locks"}
_TRANSIENT_SUFFIXES = (".lock", ".tmp")


def cache_members(cache_dir: Path, suffix: str | None = None) -> list[str]:
    """Relative paths of the persistent files in a cache dir, optionally only `*suffix`."""
    out = []
    for dirpath, dirnames, filenames in os.walk(cache_dir):
        rel_dir = Path(dirpath).relative_to(cache_dir)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in _TRANSIENT_DIRS]
        for name in filenames:
            if name.endswith(_TRANSIENT_SUFFIXES) or name.startswith(".torchwarm"):
                continue
            if suffix is not None and not name.endswith(suffix):
                continue
            path = Path(dirpath, name)
            if path.is_symlink():
                continue
            out.append((rel_dir / name).as_posix())
    return sorted(out)
