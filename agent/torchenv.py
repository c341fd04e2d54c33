"""Where torch's compile caches live, as torch reads it: from the environment, at each use."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

# Triton keeps its cache under TORCHINDUCTOR_CACHE_DIR/triton unless TRITON_CACHE_DIR is set;
# torchwarm leaves it unset so that one directory holds every cache a node needs.
CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def cache_env(cache_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment (a copy of `base` or os.environ) whose torch caches live in `cache_dir`."""
    env = dict(os.environ if base is None else base)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    env.pop("TRITON_CACHE_DIR", None)
    return env


@contextlib.contextmanager
def torch_cache_dir(path: Path) -> Iterator[None]:
    """Point this process's torch caches at `path` for a while, then restore."""
    saved = {k: os.environ.get(k) for k in CACHE_VARS}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ.pop("TRITON_CACHE_DIR", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
