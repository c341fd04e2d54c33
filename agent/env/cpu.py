"""What the CPU makes torch compile: read from /proc/cpuinfo, not from torch.

torch builds CPU kernels with `-march=native` unless TORCHINDUCTOR_CPP_MARCH names a
target (torch/_inductor/cpp_builder.py `_get_cpu_arch_cflags`), and its cache keys hold
that literal flag, not the CPU. Two CPUs with the same vector ISA but other extensions
(AVX512-BF16/FP16/VBMI2, AVX-VNNI, AMX) are different targets: a kernel built for one
may run illegal or wrong instructions on the other. So the fingerprint's `cpu` field is:

- `-march=native` (the default): the CPU's identity, vendor, family and model (what gcc
  tunes for), and every instruction-set extension it has (what gcc may emit);
- a pinned `-march=TARGET`: the target, and the vector-ISA flags torch adds on top of it
  (`cpu_vec_isa.VecISA.build_arch_flags`: the vector ISA it picks, plus AVX512-BF16 and
  AMX-FP16 when the CPU has them). CPUs of several models then share one cache.

Everything here is a pure function of the cpuinfo text (tests inject simulated CPUs).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    """The first processor's identity lines and the flags every processor has."""

    identity: dict[str, str] = field(default_factory=dict)
    flags: frozenset[str] = frozenset()
    cores: dict[int, tuple[str, str]] = field(default_factory=dict)  # cpu -> (package, core)

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
            return cls.parse(path.read_text(errors="replace"))
        except OSError:
            return cls()

    @property
    def isa(self) -> list[str]:
        pattern = _ISA_ARM if "implementer" in self.identity else _ISA_X86
        return sorted(f for f in self.flags if pattern.fullmatch(f))

    # -- torch's choices, recomputed -----------------------------------------------------

    def vec_isa_candidates(self, machine: str) -> list[str]:
        """torch's valid_vec_isa_list(), best first, as its str() (cpu_vec_isa.py), assuming
        the compiler builds every ISA the CPU has. SVE, which torch also calls "asimd"
        though it compiles it otherwise, is "sve" here."""
        f = self.flags
        if machine in ("x86_64", "AMD64"):
            avx512 = {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= f
            vnni = avx512 and "avx512_vnni" in f
            out = []
            if vnni and "amx_tile" in f:
                out.append("avx512 avx512_vnni amx_tile")
            if vnni:
                out.append("avx512 avx512_vnni")
            if avx512:
                out.append("avx512")
            if "avx2" in f:
                out.append("avx2")
            return out
        if machine == "aarch64":
            if ({"sve", "sve2"} & f) and "bf16" in f:
                return ["sve"]
            return ["asimd"]
        if machine == "ppc64le":
            return ["vsx"]
        if machine == "s390x" and "vxe" in f:
            return ["zvector"]
        return []

    def vec_isa(self, machine: str, capability: str | None) -> str:
        """What torch's pick_vec_isa() returns (its str()), ATEN_CPU_CAPABILITY included."""
        valid = self.vec_isa_candidates(machine)
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

    def target(self, machine: str, march: str | None, capability: str | None) -> dict[str, Any]:
        """The code-generation target: see the module docstring."""
        if march is None or march == "native":
            return {"march": "native", **self.identity, "isa": self.isa}
        vec = self.vec_isa(machine, capability)
        extra = [x for x in ("avx512_bf16", "amx_fp16") if x in self.flags and "avx512" in vec]
        return {"march": march, "vec_isa": vec, "extra": extra}

    def physical_cores(self, cpus: set[int]) -> int:
        """Distinct (package, core) pairs among `cpus`; len(cpus) where cpuinfo has no ids."""
        known = {self.cores[c] for c in cpus if c in self.cores}
        return len(known) if known else len(cpus)


def affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))
