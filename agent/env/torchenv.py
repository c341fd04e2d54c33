"""Where torch's compile caches live, as torch reads it: from the environment, at each use."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

# Triton keeps its cache under TORCHINDUCTOR_CACHE_DIR/triton unless TRITON_CACHE_DIR is set;
# torchwarm leaves it unset so that one directory holds every cache a node needs.
CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
PLACEHOLDER = "{cache_dir}"  # in a config's `env` values (expand)


def expand(extra: Mapping[str, str], cache_dir: Path) -> dict[str, str]:
    """`extra` (a config's `env`) with every {cache_dir} replaced by `cache_dir`: the
    warm-up's empty folder on the seed, the node's cache_dir for the app. So another
    compile cache (VLLM_CACHE_ROOT={cache_dir}/vllm) lives inside torch's and travels
    and installs with it."""
    return {k: v.replace(PLACEHOLDER, str(cache_dir)) for k, v in extra.items()}


def cache_env(
    cache_dir: Path, base: Mapping[str, str] | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """An environment (a copy of `base` or os.environ, plus `extra` expanded for
    `cache_dir`) whose torch caches live in `cache_dir`."""
    env = dict(os.environ if base is None else base)
    env.update(expand(extra or {}, cache_dir))
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    env.pop("TRITON_CACHE_DIR", None)
    return env


@contextlib.contextmanager
def torch_cache_dir(path: Path, extra: Mapping[str, str] | None = None) -> Iterator[None]:
    """Point this process's torch caches (and the variables of `extra`, expanded) at
    `path` for a while, then restore."""
    added = expand(extra or {}, path)
    saved = {k: os.environ.get(k) for k in (*CACHE_VARS, *added)}
    os.environ.update(added)
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
