"""The environment fingerprint: every fact a torch.compile cache hit depends on.

Two machines share a cache only if every field is equal. Seed and node compute it the
same way, here, without importing torch or initialising a GPU (a node agent pays
milliseconds, not torch's import): torch's facts are read from its installed files,
the CPU's from /proc/cpuinfo, GPUs' from NVML, the rest from the environment.
`SOURCES` says where each field comes from (`torchwarm fingerprint --sources`).

Fields in torch's own cache keys (its sources, GPU, CUDA, Triton, thread count) only
need to be at least as fine as torch's: a coarser field would cost a useless download,
never a wrong result. The CPU code-generation target is not in torch's keys and must be
exact (cpu.py): a cache built for other CPU extensions *hits* and may compute wrong
numbers. Where torch keeps its caches, and anything that names a connection or could hold
a credential, never enters the fingerprint (it is stored in every manifest).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torchwarm.env import compat
from torchwarm.env.cpu import CpuInfo, affinity
from torchwarm.errors import ConfigError

# Bump when the set or meaning of fields changes: old and new agents then never share.
FINGERPRINT_VERSION = 2

SOURCES = {
    "fingerprint_version": "torchwarm's own version of this field set",
    "machine": "platform.machine()",
    "os": "platform.system()",
    "libc": "the C library's own version string (confstr CS_GNU_LIBC_VERSION)",
    "python": "the running interpreter (run torchwarm with the app's Python)",
    "torch": "torch's dist-info: Version",
    "torch_git": "torch/version.py: git_version, read as text",
    "torch_record": "sha256 of torch's dist-info RECORD, which lists every installed file's "
    "sha256: a change in any of torch's files changes it (stands for torch_key())",
    "triton": "triton's dist-info: Version",
    "cuda": "torch/version.py: cuda",
    "hip": "torch/version.py: hip",
    "gpus": "NVML (nvidia-ml-py): name and compute capability of every GPU in "
    "CUDA_VISIBLE_DEVICES; none on a CPU build of torch; torch itself (slow) for ROCm, "
    "without nvidia-ml-py, or where CUDA's device numbers may not be NVML's (indexes in "
    "CUDA_VISIBLE_DEVICES on a machine with mixed GPU models, CUDA_DEVICE_ORDER not "
    "PCI_BUS_ID)",
    "cpu_vec_isa": "/proc/cpuinfo flags and $ATEN_CPU_CAPABILITY, decided as torch's "
    "pick_vec_isa() decides",
    "cpu": "/proc/cpuinfo and $TORCHINDUCTOR_CPP_MARCH: with -march=native the CPU's vendor, "
    "family, model and instruction-set extensions; with a pinned target that target and "
    "the vector flags torch adds; with SVE (Arm) the vector width torch compiles for, from "
    "this process's vector length (prctl)",
    "threads": "$OMP_NUM_THREADS, $MKL_NUM_THREADS, and the CPUs and physical cores this "
    "process may run on (what torch.get_num_threads() follows)",
    "compile_env": "$TORCH_COMPILE_JOB_ID and the TORCHINDUCTOR_* settings (not the cache "
    "location or switches, the compile thread count, connections or credentials; a path "
    "enters as its digest)",
    "include_layout": "the Python include dir and torch's install dir (CPU kernel .so names "
    "hash compiler command lines that hold them)",
}

# TORCHINDUCTOR_* variables left out: torch's that do not change the code it generates
# (compat.py), and anything naming a connection or credential.
_LEFT_OUT = re.compile(
    compat.INDUCTOR_ENV_NOT_CODE
    + r"|.*(^|_)(URL|URI|HOST|PORT|REDIS|REMOTE|KEY|TOKEN|SECRET|PASSWORD|PASS|AUTH|CREDENTIALS?)"
    r"(_|$).*"
)
# The environment variables the fingerprint reads, with the fields each one feeds: these
# names, and the TORCHINDUCTOR_* settings that compile_env keeps. collect() sees no other
# variable (tested), so a seed tells from a name alone whether a variable of its config's
# `env` would change the fingerprint (warmup.py refuses those).
ENV_NAMES: dict[str, tuple[str, ...]] = {
    "OMP_NUM_THREADS": ("threads",),
    "MKL_NUM_THREADS": ("threads",),
    "ATEN_CPU_CAPABILITY": ("cpu", "cpu_vec_isa"),
    "TORCHINDUCTOR_CPP_MARCH": ("compile_env", "cpu"),
    "TORCH_COMPILE_JOB_ID": ("compile_env",),
    "CUDA_VISIBLE_DEVICES": ("gpus",),
    "CUDA_DEVICE_ORDER": ("gpus",),
    # Which GPUs ROCm's torch sees (read by torch in the GPU child, _gpus_from_torch).
    "HIP_VISIBLE_DEVICES": ("gpus",),
    "ROCR_VISIBLE_DEVICES": ("gpus",),
}
ENV_PREFIXES: dict[str, tuple[str, ...]] = {"TORCHINDUCTOR_": ("compile_env",)}  # less _LEFT_OUT
# A plain setting: a number, a flag, a name. Other values (paths) enter as a digest.
_PLAIN = re.compile(r"[A-Za-z0-9_.,:+-]{0,64}")
_TRITON_DISTS = ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu")


def env_fields(name: str) -> tuple[str, ...]:
    """The fingerprint fields environment variable `name` feeds (ENV_NAMES, ENV_PREFIXES);
    () for a variable the fingerprint never reads."""
    if name in ENV_NAMES:
        return ENV_NAMES[name]
    for prefix, feeds in ENV_PREFIXES.items():
        if name.startswith(prefix) and not _LEFT_OUT.fullmatch(name[len(prefix) :]):
            return feeds
    return ()


def compile_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables that set how torch generates code: TORCH_COMPILE_JOB_ID (PGO profiles,
    outside torch's keys) and the TORCHINDUCTOR_* settings, which torch 2.13 puts in its
    FX-graph key nearly all (log paths and timeouts included: measured), so that a miss
    they cause is named. Left out (`_LEFT_OUT`): the cache location and switches, the
    compile thread count, connections and credentials. A value that is not a plain
    setting (a path) enters as "sha256:" and 16 hex digits: it separates caches as torch
    does, and says nothing."""
    env = os.environ if environ is None else environ
    out = {}
    for k in sorted(env):
        if "compile_env" in env_fields(k):
            value = env[k]
            if not _PLAIN.fullmatch(value):
                value = "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16]
            out[k] = value
    return out


def collect(
    environ: Mapping[str, str] | None = None, cpuinfo: CpuInfo | None = None
) -> dict[str, Any]:
    """Read the fields on this machine, without importing torch (see the module docstring),
    and of `environ` (default: this process's) only the variables env_fields() declares."""
    source = os.environ if environ is None else environ
    env = {k: source[k] for k in source if env_fields(k)}
    torch = _TorchInstall.find()
    cpus = affinity()
    info = CpuInfo.read() if cpuinfo is None else cpuinfo
    machine = platform.machine()
    march = env.get("TORCHINDUCTOR_CPP_MARCH") or None
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "machine": machine,
        "os": platform.system(),
        "libc": _libc(),
        "python": f"{sys.implementation.name} {platform.python_version()}",
        "torch": torch.version,
        "torch_git": torch.attr("git_version"),
        "torch_record": torch.record_digest(),
        "triton": _dist_version(_TRITON_DISTS),
        "cuda": torch.attr("cuda"),
        "hip": torch.attr("hip"),
        "gpus": _gpus(torch, env),
        "cpu_vec_isa": info.vec_isa(machine, env.get("ATEN_CPU_CAPABILITY")),
        "cpu": info.target(machine, march, env.get("ATEN_CPU_CAPABILITY")),
        "threads": {
            "omp": _count(env.get("OMP_NUM_THREADS")),
            "mkl": _count(env.get("MKL_NUM_THREADS")),
            "cpus": len(cpus),
            "cores": info.physical_cores(cpus),
        },
        "compile_env": compile_env(env),
        "include_layout": {
            "python_include": _python_include(),
            "torch_dir": str(torch.package_dir),
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


# -- torch, from its files ---------------------------------------------------------------


class _TorchInstall:
    """The torch distribution the app imports, found by its metadata (a `torch` package
    that shadows it on sys.path, or one that fails to import, changes nothing here)."""

    def __init__(self, dist: Any) -> None:
        self.dist = dist
        self.version: str = dist.version
        self.package_dir = Path(dist.locate_file("torch"))
        self._version_py: dict[str, Any] | None = None

    @classmethod
    def find(cls) -> _TorchInstall:
        from importlib import metadata

        try:
            return cls(metadata.distribution("torch"))
        except metadata.PackageNotFoundError:
            raise ConfigError(
                "torch is not installed here (no torch dist-info on sys.path); the "
                "fingerprint is read from the app's own torch: run torchwarm in the app's "
                "image or virtualenv"
            ) from None

    def attr(self, name: str) -> Any:
        """A constant of torch/version.py, read as text (never executed)."""
        if self._version_py is None:
            self._version_py = {}
            try:
                tree = ast.parse((self.package_dir / "version.py").read_text())
            except (OSError, SyntaxError, ValueError):
                tree = ast.Module(body=[], type_ignores=[])
            for node in tree.body:
                target = (
                    node.targets[0]
                    if isinstance(node, ast.Assign)
                    else getattr(node, "target", None)
                )
                value = getattr(node, "value", None)
                if isinstance(target, ast.Name) and value is not None:
                    try:
                        self._version_py[target.id] = ast.literal_eval(value)
                    except ValueError:
                        continue
        return self._version_py.get(name)

    def record_digest(self) -> str:
        record = self.dist.read_text("RECORD")
        if record:
            return hashlib.sha256(record.encode()).hexdigest()
        # No RECORD (a source build installed in develop mode): ask torch itself (slow).
        return "torch_key:" + compat.torch_key()


def _dist_version(names: tuple[str, ...]) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


# -- GPUs ----------------------------------------------------------------------------------


def _gpus(torch: _TorchInstall, env: dict[str, str]) -> list[str]:
    """'<name> sm_<major><minor>' for every visible GPU, as torch would name them; `env`
    holds the declared variables only (ENV_NAMES)."""
    if torch.attr("cuda") is None and torch.attr("hip") is None:
        return []  # a CPU build of torch sees no GPU, whatever the machine has
    # torch's child needs this process's environment to start (PATH, library paths);
    # of the variables the fingerprint reads, it gets those of `env` only.
    child_env = {k: v for k, v in os.environ.items() if not env_fields(k)} | env
    if torch.attr("hip") is not None:
        return _gpus_from_torch(child_env)  # ROCm: NVML does not apply; torch's answer (slow)
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return _gpus_from_torch(child_env)
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []  # no driver: torch.cuda.is_available() is False as well
    try:
        spec = env.get("CUDA_VISIBLE_DEVICES")
        if _numbering_may_differ(pynvml, spec, env.get("CUDA_DEVICE_ORDER")):
            return _gpus_from_torch(child_env)
        return sorted({_model(pynvml, h) for h in _visible(pynvml, spec)})
    finally:
        pynvml.nvmlShutdown()


def _model(pynvml: Any, handle: Any) -> str:
    name = pynvml.nvmlDeviceGetName(handle)
    name = name.decode() if isinstance(name, bytes) else name
    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    return f"{name} sm_{major}{minor}"


def _numbering_may_differ(pynvml: Any, spec: str | None, order: str | None) -> bool:
    """Whether device indexes in CUDA_VISIBLE_DEVICES may name other GPUs for CUDA than
    for NVML. NVML numbers GPUs by PCI bus; CUDA, unless CUDA_DEVICE_ORDER=PCI_BUS_ID,
    fastest first (ties by PCI bus). The two agree where every GPU is the same model."""
    if order == "PCI_BUS_ID" or spec is None:
        return False
    if not any(t.strip().isdigit() for t in spec.split(",")):
        return False  # UUIDs name the same device for both
    all_gpus = range(pynvml.nvmlDeviceGetCount())
    return len({_model(pynvml, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in all_gpus}) > 1


def _visible(pynvml: Any, spec: str | None) -> list[Any]:
    """NVML handles of the devices CUDA_VISIBLE_DEVICES lets CUDA see, as CUDA parses it:
    indexes or GPU-/MIG- UUIDs, up to the first entry that names no device."""
    count = pynvml.nvmlDeviceGetCount()
    if spec is None:
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    handles = []
    for token in (t.strip() for t in spec.split(",")):
        try:
            if token.isdigit() and int(token) < count:
                handles.append(pynvml.nvmlDeviceGetHandleByIndex(int(token)))
            elif token.startswith(("GPU-", "MIG-")):
                handles.append(pynvml.nvmlDeviceGetHandleByUUID(token))
            else:
                break
        except pynvml.NVMLError:
            break
    return handles


# Bounds a GPU runtime that hangs at start-up (a pull's deadline is shorter still).
_TORCH_GPUS_TIMEOUT_S = 120.0
_TORCH_GPUS = """
import json, torch
gpus = []
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        gpus.append(f"{torch.cuda.get_device_name(i)} sm_{major}{minor}")
print(json.dumps(sorted(set(gpus))))
"""


def _gpus_from_torch(env: dict[str, str]) -> list[str]:
    """torch's own answer, in a child process with `env` (the variables CUDA reads at
    start-up are those of the process whose fingerprint this is; and no GPU runtime is
    started in this one, which may fork later)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _TORCH_GPUS], env=env, capture_output=True, text=True,
            timeout=_TORCH_GPUS_TIMEOUT_S, check=True,
        )  # fmt: skip
        gpus = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        raise ConfigError(
            f"cannot list the GPUs through torch ({type(e).__name__}: {e}); run torchwarm "
            "with the app's Python and torch"
        ) from None
    return [str(g) for g in gpus]


# -- the rest --------------------------------------------------------------------------------


def _libc() -> str:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        libc, version = platform.libc_ver()
        return f"{libc} {version}".strip()


def _python_include() -> str:
    import sysconfig

    return sysconfig.get_paths()["include"]


def _count(value: str | None) -> str | None:
    """A thread-count variable as OpenMP and MKL read it ("4", or "4,2" nested); anything
    else they ignore, and so does the fingerprint."""
    return value.strip() if value and re.fullmatch(r"\s*\d+(,\d+)*\s*", value) else None


def torch_facts(scratch: Path | None = None) -> dict[str, Any]:
    """What torch itself says about the facts above (imports torch). For `torchwarm
    fingerprint --torch` and the tests that check the fields above against torch.

    torch builds and loads an ISA-probe library in its cache dir: in `scratch`, or by
    default in a private temporary folder (mkdtemp: 0700, this user's), never a shared
    one where another user could plant the library torch loads."""
    import tempfile

    with contextlib.ExitStack() as stack:
        if scratch is None:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tw-isa-")))
        saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(scratch)
        try:
            import torch

            return {
                "torch": torch.__version__,
                "torch_git": torch.version.git_version,
                "cuda": torch.version.cuda,
                "hip": torch.version.hip,
                "gpus": _gpus_from_torch(dict(os.environ)),
                **compat.inductor_facts(),
                "threads": torch.get_num_threads(),
                "torch_dir": os.path.dirname(torch.__file__),
            }
        finally:
            if saved is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved
