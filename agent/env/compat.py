"""Everything torchwarm knows of torch beyond its public API, for the versions it was tested on.

torch's public API (`torch.compile`, `torch.compiler.*`) is called where it is needed.
Everything else lives here, each item read from torch 2.13's sources or measured on it:
- its private modules and attributes (imported lazily: the node's path never imports torch);
- the names of its hit/miss counters, of the files in its cache dir, and of its
  TORCHINDUCTOR_* settings that do not change the code it generates;
- the rules by which it picks the CPU vector ISA and the flags its CPU kernels are built
  with, which the fingerprint recomputes from /proc/cpuinfo (env/cpu.py).

`SUPPORTED` names the versions this was checked for; pyproject.toml's torch range is the
same (tests/test_packaging.py). On any other torch, every function here that reaches into
torch raises UnsupportedTorch in one line before touching it, and a warm-up checks the
version first (seed/warmup.py), so a seed stops before it captures anything. A node reads
torch's files, not its internals: it installs only what a seed with its own torch version
published (the version is in the fingerprint), and where it does need torch (torch_key()
for an install without RECORD) the same line becomes its cold-start reason (fail-open).
Unknown versions fail rather than warn: a rule that changed would give a fingerprint
coarser than torch's code, and a node a cache that computes wrong numbers.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
from importlib import metadata
from typing import Any

from torchwarm.errors import ConfigError, UnsupportedTorch, WarmupError

# (major, minor) of the torch releases the suite ran on; any patch release of them.
SUPPORTED: tuple[tuple[int, int], ...] = ((2, 13),)


def requirement() -> str:
    """The pip specifier of SUPPORTED, as pyproject.toml declares it: ">=2.13,<2.14"."""
    (lo_major, lo_minor), (hi_major, hi_minor) = min(SUPPORTED), max(SUPPORTED)
    return f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor + 1}"


def require_supported(version: str | None = None) -> None:
    """Raise UnsupportedTorch unless `version` (default: the installed torch's, read from
    its metadata without importing it) is a release of SUPPORTED."""
    if version is None:
        _require_installed()
        return
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or (int(m[1]), int(m[2])) not in SUPPORTED:
        import torchwarm

        supported = ", ".join(f"{a}.{b}" for a, b in SUPPORTED)
        raise UnsupportedTorch(
            f"torchwarm {torchwarm.__version__} supports torch {supported}; this is torch "
            f"{version}: install a supported torch (pip install 'torch{requirement()}')"
        )


@functools.cache
def _require_installed() -> None:
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        raise ConfigError(
            f"torch is not installed here; install a supported torch (pip install "
            f"'torch{requirement()}') in the app's image or virtualenv"
        ) from None
    require_supported(version)


# -- counters (torch/_dynamo/utils.py `counters`) -------------------------------------------

# Counter groups and the names that prove a hit or a miss.
COUNTERS = {
    "inductor": ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass"),
    "aot_autograd": ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass"),
    # Precompiled Dynamo entries (TORCH_CACHING_PRECOMPILE=1): a hit skips Dynamo too.
    "dynamo_cache": ("dynamo_cache_hit", "dynamo_cache_miss", "dynamo_cache_error"),
}


def counters() -> Any:
    """torch's process-wide counters (group -> Counter); clear() starts them again."""
    require_supported()
    from torch._dynamo.utils import counters as found

    return found


# -- Dynamo and Inductor in the warm-up process ---------------------------------------------


def set_caching_precompile(on: bool) -> None:
    """Turn torch's caching-precompile mode on or off in this process (the variable
    TORCH_CACHING_PRECOMPILE is read only when torch is imported)."""
    require_supported()
    import torch._dynamo.config

    torch._dynamo.config.caching_precompile = on


def set_unique_id_base(base: int) -> None:
    """Draw Dynamo's process-wide unique ids (the names of the globals a compiled frame
    installs, e.g. `__builtins_dict___0`) from `base` on. A node that loads a precompiled
    entry and then recompiles draws from its own counter, from 0, and torch 2.13 fails with
    "Name ... already exists in scope" where the seed's names start there too."""
    require_supported()
    import torch._dynamo.bytecode_transformation as bt

    if not isinstance(getattr(bt, "_unique_id_counter", None), itertools.count):
        raise WarmupError(
            f"this torch ({metadata.version('torch')}) has no Dynamo unique-id counter where "
            "torchwarm expects it (torch/_dynamo/bytecode_transformation.py); format "
            "'precompile' is not supported with it"
        )
    bt._unique_id_counter = itertools.count(base)


def mark_dynamic(tensor: Any, dim: int) -> None:
    """Compile `tensor`'s dimension `dim` for any size."""
    require_supported()
    import torch._dynamo

    torch._dynamo.mark_dynamic(tensor, dim)


def import_inductor() -> None:
    """Import Inductor's compiler, which torch.compile() would import on its first call
    (so that the import is not counted as compile time)."""
    require_supported()
    import torch._inductor.compile_fx  # noqa: F401


def torch_key() -> str:
    """torch's own hash of its sources (in every FX-graph key), as hex. Slow (seconds)."""
    require_supported()
    from torch._inductor.codecache import torch_key as key

    return key().hex()


def inductor_facts() -> dict[str, Any]:
    """What torch itself says of the facts its FX-graph and kernel keys hold: torch_key(),
    the vector ISA and the CPU flags kernels are built with, TORCHINDUCTOR_CPP_MARCH, and
    a digest of the inductor settings (env-set ones too). Builds and loads torch's ISA
    probe in TORCHINDUCTOR_CACHE_DIR: the caller chooses it."""
    require_supported()
    from torch._inductor import config
    from torch._inductor.cpp_builder import _get_cpu_arch_cflags, get_cpp_compiler
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    settings = json.dumps(config.save_config_portable(), sort_keys=True, default=str)
    return {
        "torch_key": torch_key(),
        "cpu_vec_isa": str(isa),
        "cpu_flags": _get_cpu_arch_cflags(get_cpp_compiler()) + isa.build_arch_flags().split(),
        "cpp_march": config.cpp.march,
        "inductor_config": hashlib.sha256(settings.encode()).hexdigest(),
    }


# -- environment ------------------------------------------------------------------------------

# TORCHINDUCTOR_* settings (the name after the prefix) that do not change the code torch
# generates: where it keeps its caches and whether it uses them (a node's differ by
# design), and how many processes compile (not in torch's FX-graph key either; seeds
# often compile with more). The fingerprint leaves them out.
INDUCTOR_ENV_NOT_CODE = r"CACHE_DIR|(FX_GRAPH|AUTOGRAD)_CACHE(_DEFAULT)?|COMPILE_THREADS"


# -- the cache dir's layout ------------------------------------------------------------------

# Lock files, in-flight files (write_atomic: "<name>.<pid>.<tid>.tmp", or hidden) and the
# temp folders of Triton and torch's Triton bundler ("tmp.*").
LOCKS_DIR = "locks"
TRANSIENT_SUFFIXES = (".lock", ".tmp")
IN_FLIGHT_PREFIXES = (".", "tmp.")
FXGRAPH_DIR = "fxgraph"  # fxgraph/<xx>/<key>/<entry>
AOTAUTOGRAD_DIR = "aotautograd"  # aotautograd/<key>/<entry>
TRITON_DIR = "triton"  # triton/<device>/<hash>/__grp__<name>.json, one per kernel
TRITON_KERNEL = re.compile(r"__grp__.*\.json", re.DOTALL)
# Precompiled Dynamo entries (torch/_dynamo/package.py): dynamo/<sha256>/entry. Dynamo's
# profiles (dynamo/code_state_*.pkl) are not entries.
DYNAMO_DIR = "dynamo"
DYNAMO_ENTRY = re.compile(r"dynamo/([0-9a-f]{64})/entry")
# Inductor's CPU kernels are `<xx>/<key>.main.so` (CppCodeCache, `main.cpp`); a plain
# `<xx>/<key>.so` is the ISA check (cpu_vec_isa.check_build), not a kernel.
CPU_KERNEL_SUFFIX = ".main.so"


# -- CPU code generation (torch/_inductor/cpu_vec_isa.py, cpp_builder.py) --------------------
# Recomputed from /proc/cpuinfo flags, assuming the compiler builds every ISA the CPU has.


def vec_isa_candidates(flags: frozenset[str], machine: str) -> list[str]:
    """valid_vec_isa_list(), best first, as its str(). SVE (VecSVE), which torch also
    calls "asimd" though it compiles it otherwise, is "sve" here."""
    if machine in ("x86_64", "AMD64"):
        avx512 = {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags
        vnni = avx512 and "avx512_vnni" in flags
        out = []
        if vnni and "amx_tile" in flags:
            out.append("avx512 avx512_vnni amx_tile")
        if vnni:
            out.append("avx512 avx512_vnni")
        if avx512:
            out.append("avx512")
        if "avx2" in flags:
            out.append("avx2")
        return out
    if machine == "aarch64":
        if ({"sve", "sve2"} & flags) and "bf16" in flags:
            return ["sve"]
        return ["asimd"]
    if machine == "ppc64le":
        return ["vsx"]
    if machine == "s390x" and "vxe" in flags:
        return ["zvector"]
    return []


def pick_vec_isa(flags: frozenset[str], machine: str, capability: str | None) -> str:
    """pick_vec_isa()'s str(), ATEN_CPU_CAPABILITY (`capability`) included."""
    valid = vec_isa_candidates(flags, machine)
    if not valid:
        return "INVALID_VEC_ISA"
    wanted = {"default": None, "zvector": "zvector", "vsx": "vsx", "avx2": "avx2",
              "avx512": "avx512"}  # fmt: skip
    if capability in wanted:
        if wanted[capability] is None:
            return "INVALID_VEC_ISA"
        for isa in valid:
            if wanted[capability] in isa:  # a substring, as torch matches it
                return isa
    return valid[0]


def sve_vector_bits(sve_bits: int | None) -> int:
    """The SVE width torch compiles for (VecSVE: `-msve-vector-bits`): 128 where the
    CPU's vector length is 128 bits (torch.cpu.get_capabilities()["sve_max_length"],
    this process's length as cpuinfo reads it), else 256, unknown included."""
    return 128 if sve_bits == 128 else 256


def vec_isa_flags(flags: frozenset[str], vec: str, sve_bits: int | None) -> list[str]:
    """What VecISA.build_arch_flags() adds to the compile line beyond the vector ISA `vec`,
    by the cpuinfo names that decide it: AVX512-BF16 and AMX-FP16 (when the CPU has them);
    for SVE, SVE2 (torch then targets armv9-a+sve2+fp16fml+sha3+bf16+i8mm instead of
    armv8-a+sve+bf16) and the vector width."""
    if "avx512" in vec:
        return [x for x in ("avx512_bf16", "amx_fp16") if x in flags]
    if vec == "sve":
        sve2 = ["sve2"] if "sve2" in flags else []
        return [*sve2, f"sve_vector_bits={sve_vector_bits(sve_bits)}"]
    return []
