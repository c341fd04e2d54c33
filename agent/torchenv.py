"""Where torch's compile caches live, as torch reads it: from the environment, at each use."""

from __future__ import annotations

import contextlib
import os
import tempfile
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


def probe_scratch() -> Path:
    """Where the agent lets torch build its CPU ISA probe when computing a fingerprint.

    Never the node's cache dir (nothing may touch it before the install). Kept across
    runs, so that only the first pull on a machine pays the probe's compile (~5 s): the
    user's cache folder, or the temp folder where that is not writable. What is built
    here is made locally, never read from a store.
    """
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    fallback = Path(tempfile.gettempdir()) / f"torchwarm-isa-probe-{os.getuid()}"
    for candidate in (base / "torchwarm" / "isa-probe", fallback):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK):
                return candidate
        except OSError:
            continue
    return Path(tempfile.mkdtemp(prefix="torchwarm-isa-probe-"))


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
