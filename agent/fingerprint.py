"""The environment fingerprint: every fact a torch.compile cache hit depends on.

Two machines share a cache only if every field is equal. Some fields are in torch's
own cache keys (torch_key, GPU, CUDA, Triton, thread count); one is not but must be:
the CPU vector ISA. Torch's FX-graph key leaves it out, so a cache built for AVX512
*hits* on an AVX2 machine and computes wrong numbers (BRIEF.md, "Facts measured").
The include-path layout is here because CPU kernel `.so` names hash the compiler
command line, which holds absolute include paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import sysconfig
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .torchenv import torch_cache_dir

# Bump when the set or meaning of fields changes: old and new agents then never share.
FINGERPRINT_VERSION = 1

# TORCHINDUCTOR_* variables that say where or whether to cache, not what to compile.
_NOT_KEY_RELEVANT = {
    "TORCHINDUCTOR_CACHE_DIR",
    "TORCHINDUCTOR_FX_GRAPH_CACHE",
    "TORCHINDUCTOR_AUTOGRAD_CACHE",
    "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE",
    "TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE",
    "TORCHINDUCTOR_COMPILE_THREADS",
}


def compile_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables that change torch.compile's output or cache keys."""
    env = os.environ if environ is None else environ
    return {
        k: env[k]
        for k in sorted(env)
        if (k.startswith("TORCHINDUCTOR_") and k not in _NOT_KEY_RELEVANT)
        or k == "TORCH_COMPILE_JOB_ID"
    }


def collect(scratch: Path | None = None) -> dict[str, Any]:
    """Read the fields on this machine. Imports torch; the ISA probe may compile (~5 s once).

    Torch's ISA probe builds a small library in torch's cache dir. With `scratch`, it is
    built there instead (the node must not touch its cache dir before the install);
    without, in the current TORCHINDUCTOR_CACHE_DIR (the warm-up: the probe's result then
    travels with the cache and spares the node's main process the same 5 s).
    """
    if scratch is not None:
        with torch_cache_dir(scratch):
            return collect()
    try:
        import torch
    except ImportError as e:
        raise ConfigError(
            f"cannot import torch ({e}); the fingerprint is read from the app's own torch: "
            "run torchwarm in the app's image or virtualenv"
        ) from None
    from torch._inductor.codecache import torch_key
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    try:
        import triton  # type: ignore[import-not-found]

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None

    gpus: list[str] = []
    if torch.cuda.is_available():
        gpus = sorted(
            {
                "{} sm_{}{}".format(
                    torch.cuda.get_device_name(i), *torch.cuda.get_device_capability(i)
                )
                for i in range(torch.cuda.device_count())
            }
        )
    libc, libc_version = platform.libc_ver()
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "machine": platform.machine(),
        "os": platform.system(),
        "libc": f"{libc} {libc_version}".strip(),
        "python": f"{sys.implementation.name} {platform.python_version()}",
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        "torch_key": torch_key().hex(),
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
        "gpus": gpus,
        "cpu_vec_isa": str(pick_vec_isa()),
        "threads": torch.get_num_threads(),
        "compile_env": compile_env(),
        "include_layout": {
            "python_include": sysconfig.get_paths()["include"],
            "torch_dir": os.path.dirname(torch.__file__),
        },
    }


def digest(fields: dict[str, Any]) -> str:
    """A short, stable name for a set of fields: 32 hex digits of sha256 over canonical JSON."""
    return hashlib.sha256(canonical_json(fields)).hexdigest()[:32]


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """Field names whose values differ, for "why did this node miss" messages."""
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
