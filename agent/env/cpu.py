"""What the CPU makes torch compile: read from /proc/cpuinfo, not from torch.

torch builds CPU kernels with `-march=native` unless TORCHINDUCTOR_CPP_MARCH names a
target (torch/_inductor/cpp_builder.py `_get_cpu_arch_cflags`), and its cache keys hold
that literal flag, not the CPU. Two CPUs with the same vector ISA but other extensions
(AVX512-BF16/FP16/VBMI2, AVX-VNNI, AMX) are different targets: a kernel built for one
may run illegal or wrong instructions on the other. So the fingerprint's `cpu` field is:

- `-march=native` (the default): the CPU's identity, vendor, family and model (what gcc
  tunes for), and every instruction-set extension it has (what gcc may emit); on Arm with
  SVE also the vector width torch fixes (`-msve-vector-bits`), which the identity does not
  settle (the kernel can shorten the vector length);
- a pinned `-march=TARGET`: the target, and what torch's vector ISA adds on top of it
  (`VecISA.build_arch_flags`: the vector ISA it picks, plus AVX512-BF16 and AMX-FP16 when
  the CPU has them; for SVE, SVE2 and the vector width). CPUs of several models then
  share one cache.

torch's rules themselves are in compat.py (the torch versions they were read from).
Everything here is a pure function of the cpuinfo text and the SVE vector length (tests
inject simulated CPUs).
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torchwarm.env import compat

CPUINFO = Path("/proc/cpuinfo")

# Instruction-set extensions as /proc/cpuinfo names them: what `-march=native` may turn on.
# Other flags (virtualisation, power management, security features) never change code.
_ISA_X86 = re.compile(
    r"mmx|mmxext|3dnow\w*|sse\w*|ssse3|pni|avx\w*|amx\w*|fma\w*|f16c|bmi\d|abm|lzcnt|popcnt"
    r"|movbe|aes|vaes|pclmulqdq|vpclmulqdq|gfni|sha_ni|sha512|sm3|sm4|adx|rdrand|rdseed|rdpid"
    r"|xsave\w*|clflushopt|clwb|cx8|cx16|lahf_lm|fsgsbase|movdiri|movdir64b|waitpkg|cldemote"
    r"|serialize|tsxldtrk|enqcmd|ptwrite|wbnoinvd|uintr|hreset|pku|ospke|xop|tbm|lwp|clzero"
    r"|mwaitx|rtm|hle|cmpccxadd|raoint|prefetchi|apx\w*|user_shstk|pconfig|sgx|kl|widekl"
)
_ISA_ARM = re.compile(
    r"fp|asimd\w*|aes|pmull|sha\d|sm3|sm4|crc32|atomics|fphp|jscvt|fcma|lrcpc|ilrcpc|dcpop"
    r"|dcpodp|sve\w*|dotprod|i8mm|bf16|ebf16|rng|bti|mte\w*|flagm\w*|frint|sme\w*|wfxt"
    r"|rpres|mops|hbc|cssc|rprfm|lse\w*|f32mm|f64mm"
)
# The identity lines (x86, then aarch64), by the names the fingerprint gives them.
_IDENTITY = {"vendor_id": "vendor", "cpu family": "family", "model": "model",
             "CPU implementer": "implementer", "CPU architecture": "architecture",
             "CPU variant": "variant", "CPU part": "part"}  # fmt: skip


@dataclass(frozen=True)
class CpuInfo:
    """The first processor's identity lines, the flags every processor has, and on Arm
    this process's SVE vector length."""

    identity: dict[str, str] = field(default_factory=dict)
    flags: frozenset[str] = frozenset()
    cores: dict[int, tuple[str, str]] = field(default_factory=dict)  # cpu -> (package, core)
    sve_bits: int | None = None  # None: no SVE, or not known

    @classmethod
    def parse(cls, text: str) -> CpuInfo:
        identity: dict[str, str] = {}
        flags: frozenset[str] | None = None
        cores: dict[int, tuple[str, str]] = {}
        for block in text.strip().split("\n\n"):
            entry: dict[str, str] = {}
            for line in block.splitlines():
                key, sep, value = line.partition(":")
                if sep:
                    entry[key.strip()] = value.strip()
            if not identity:
                identity = {name: entry[k] for k, name in _IDENTITY.items() if k in entry}
            these = frozenset((entry.get("flags") or entry.get("Features") or "").split())
            flags = these if flags is None else flags & these  # all processors have them
            cpu = entry.get("processor", "")
            if cpu.isdigit():
                cores[int(cpu)] = (entry.get("physical id", "0"), entry.get("core id", cpu))
        return cls(identity, flags or frozenset(), cores)

    @classmethod
    def read(cls, path: Path = CPUINFO) -> CpuInfo:
        try:
            info = cls.parse(path.read_text(errors="replace"))
        except OSError:
            return cls()
        return replace(info, sve_bits=sve_vector_length()) if "sve" in info.flags else info

    @property
    def isa(self) -> list[str]:
        pattern = _ISA_ARM if "implementer" in self.identity else _ISA_X86
        return sorted(f for f in self.flags if pattern.fullmatch(f))

    # -- torch's choices, recomputed (compat.py) ---------------------------------------

    def vec_isa(self, machine: str, capability: str | None) -> str:
        """What torch's pick_vec_isa() returns (its str()), ATEN_CPU_CAPABILITY included."""
        return compat.pick_vec_isa(self.flags, machine, capability)

    def target(self, machine: str, march: str | None, capability: str | None) -> dict[str, Any]:
        """The code-generation target: see the module docstring."""
        vec = self.vec_isa(machine, capability)
        if march is None or march == "native":
            out: dict[str, Any] = {"march": "native", **self.identity, "isa": self.isa}
            if vec == "sve":  # torch fixes the width, which the CPU's identity does not
                out["sve_vector_bits"] = compat.sve_vector_bits(self.sve_bits)
            return out
        return {"march": march, "vec_isa": vec,
                "extra": compat.vec_isa_flags(self.flags, vec, self.sve_bits)}  # fmt: skip

    def physical_cores(self, cpus: set[int]) -> int:
        """Distinct (package, core) pairs among `cpus`; len(cpus) where cpuinfo has no ids."""
        known = {self.cores[c] for c in cpus if c in self.cores}
        return len(known) if known else len(cpus)


def affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def sve_vector_length() -> int | None:
    """This process's SVE vector length in bits (Linux prctl PR_SVE_GET_VL, which torch's
    cpuinfo asks too), or None where there is no SVE or no answer."""
    if platform.system() != "Linux" or platform.machine() != "aarch64":
        return None
    try:
        ret = ctypes.CDLL(None, use_errno=True).prctl(51, 0, 0, 0, 0)  # PR_SVE_GET_VL
    except (OSError, AttributeError):
        return None
    return (ret & 0xFFFF) * 8 if ret > 0 else None  # PR_SVE_VL_LEN_MASK: bytes
