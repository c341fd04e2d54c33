"""The CPU part of the fingerprint, on simulated CPUs (cpuinfo text injected): the exact
code-generation target under -march=native, the coarser one under a pinned march, and
torch's vector-ISA choice."""

from __future__ import annotations

from dataclasses import replace

import pytest

from torchwarm.env import fingerprint
from torchwarm.env.cpu import CpuInfo

BASE = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat clflush mmx fxsr "
BASE += "sse sse2 ht syscall nx lm pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes "
BASE += "xsave avx f16c rdrand lahf_lm abm bmi1 avx2 bmi2 adx rdseed clflushopt"
AVX512 = " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512ifma avx512vbmi"
ICELAKE = ("GenuineIntel", 6, 106, BASE + AVX512 + " avx512_vbmi2 gfni vaes vpclmulqdq")
SAPPHIRE = ("GenuineIntel", 6, 143, ICELAKE[3] + " avx512_bf16 avx512_fp16 avx_vnni amx_tile "
            "amx_bf16 amx_int8")  # fmt: skip
ZEN4 = ("AuthenticAMD", 25, 17, BASE + AVX512 + " avx512_vbmi2 gfni vaes vpclmulqdq avx512_bf16")
ZEN4C = ("AuthenticAMD", 25, 160, ZEN4[3])  # another model, the same extensions
ZEN3 = ("AuthenticAMD", 25, 1, BASE + " vaes vpclmulqdq")
HASWELL_NO_AVX2 = ("GenuineIntel", 6, 60, BASE.replace(" avx2", ""))


def cpuinfo(cpu: tuple, processors: int = 2, extra: str = "", threads_per_core: int = 1) -> str:
    """/proc/cpuinfo text of a simulated x86 CPU."""
    vendor, family, model, flags = cpu
    blocks = []
    for i in range(processors):
        blocks.append(
            f"processor\t: {i}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
            f"model name\t: simulated\nstepping\t: {i % 3}\ncpu MHz\t\t: {2000 + i}.0\n"
            f"physical id\t: 0\ncore id\t\t: {i // threads_per_core}\nflags\t\t: {flags}{extra}\n"
            f"bogomips\t: {4000 + 7 * i}.00\n"
        )
    return "\n".join(blocks)


def target(cpu: tuple, march: str | None = None, **kw) -> dict:
    return CpuInfo.parse(cpuinfo(cpu, **kw)).target("x86_64", march, None)


def digest(cpu: tuple, env: dict[str, str] | None = None, **kw) -> str:
    info = CpuInfo.parse(cpuinfo(cpu, **kw))
    return fingerprint.digest(fingerprint.collect(environ=env or {}, cpuinfo=info))


def test_same_vector_isa_other_extensions_never_share():
    """Ice Lake, Sapphire Rapids without AMX in use, and Zen 4 all pick the same vector ISA
    ("avx512 avx512_vnni" or better), but differ in BF16/FP16/VBMI2/AMX: never one cache."""
    icelake, zen4 = CpuInfo.parse(cpuinfo(ICELAKE)), CpuInfo.parse(cpuinfo(ZEN4))
    assert icelake.vec_isa("x86_64", None) == zen4.vec_isa("x86_64", None) == "avx512 avx512_vnni"
    assert "avx512_bf16" in zen4.isa and "avx512_bf16" not in icelake.isa
    digests = {digest(c) for c in (ICELAKE, SAPPHIRE, ZEN4, ZEN4C, ZEN3)}
    assert len(digests) == 5


def test_the_same_cpu_model_shares_whatever_else_cpuinfo_says():
    """Two machines of one model share: clock, stepping, bogomips, core count and
    non-ISA flags (hypervisor, power management) do not change what gcc emits."""
    a = target(ZEN4, processors=2)
    b = target(ZEN4, processors=8, extra=" hypervisor constant_tsc arat")
    assert a == b
    assert digest(ZEN4, processors=2) == digest(ZEN4, processors=2, extra=" hypervisor")


def test_an_extension_missing_on_one_processor_is_not_the_machines():
    """Flags are the ones every processor has (a kernel may hide one on some)."""
    text = cpuinfo(ZEN4, processors=2)
    first, second = text.split("\n\n")
    second = second.replace(" avx512_bf16", "")
    info = CpuInfo.parse(first + "\n\n" + second)
    assert "avx512_bf16" not in info.isa and "avx512f" in info.isa


def test_a_pinned_march_shares_across_models_with_the_same_vector_flags():
    """Under TORCHINDUCTOR_CPP_MARCH=x86-64-v3, Zen 4 and Zen 4c share (same vector ISA,
    same BF16); Ice Lake does not (no AVX512-BF16, which torch adds to the flags)."""
    pinned = {"TORCHINDUCTOR_CPP_MARCH": "x86-64-v3"}
    assert digest(ZEN4, pinned) == digest(ZEN4C, pinned)
    assert digest(ZEN4) != digest(ZEN4C)  # under -march=native the model is the target
    assert digest(ZEN4, pinned) != digest(ICELAKE, pinned)
    assert target(ZEN4, "x86-64-v3") == {
        "march": "x86-64-v3", "vec_isa": "avx512 avx512_vnni", "extra": ["avx512_bf16"]
    }  # fmt: skip


@pytest.mark.parametrize(
    ("cpu", "capability", "expected"),
    [
        (SAPPHIRE, None, "avx512 avx512_vnni amx_tile"),
        (SAPPHIRE, "avx512", "avx512 avx512_vnni amx_tile"),  # torch matches a substring
        (SAPPHIRE, "avx2", "avx2"),
        (ICELAKE, None, "avx512 avx512_vnni"),
        (ICELAKE, "default", "INVALID_VEC_ISA"),
        (ICELAKE, "sse9", "avx512 avx512_vnni"),  # torch warns and ignores an unknown value
        (ZEN3, None, "avx2"),
        (ZEN3, "avx512", "avx2"),  # not available: the best valid one
        (HASWELL_NO_AVX2, None, "INVALID_VEC_ISA"),
    ],
)
def test_vector_isa_is_decided_as_torch_decides(cpu, capability, expected):
    """pick_vec_isa()'s rules: the best ISA the CPU has, or what ATEN_CPU_CAPABILITY asks."""
    assert CpuInfo.parse(cpuinfo(cpu)).vec_isa("x86_64", capability) == expected


def test_physical_cores_count_smt_siblings_once():
    """Two hardware threads per core: four processors are two cores; one CPU is one core."""
    info = CpuInfo.parse(cpuinfo(ZEN4, processors=4, threads_per_core=2))
    assert info.physical_cores({0, 1, 2, 3}) == 2
    assert info.physical_cores({0}) == 1
    assert info.physical_cores({0, 2}) == 2


GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs \
paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd40
CPU revision\t: 1
"""
GRAVITON2 = GRAVITON3.replace("0xd40", "0xd0c").replace(" sve", "").replace(" bf16", "")


def test_aarch64_identity_and_vector_isa():
    """On Arm: implementer and part name the core, Features its extensions; SVE with BF16
    is a vector ISA of its own (torch calls both "asimd" but compiles them otherwise)."""
    g3, g2 = CpuInfo.parse(GRAVITON3), CpuInfo.parse(GRAVITON2)
    assert g3.vec_isa("aarch64", None) == "sve" and g2.vec_isa("aarch64", None) == "asimd"
    t3 = g3.target("aarch64", None, None)
    assert t3["implementer"] == "0x41" and t3["part"] == "0xd40" and "sve" in t3["isa"]
    assert "cpuid" not in t3["isa"] and "evtstrm" not in t3["isa"]  # not instruction sets
    assert t3 != g2.target("aarch64", None, None)


def test_x86_security_flags_are_not_extensions():
    """Security features (smep, smap, umip) and cpuid are not what gcc emits."""
    info = CpuInfo.parse(cpuinfo(ZEN4, extra=" smep smap cpuid umip"))
    assert not {"smep", "smap", "cpuid", "umip"} & set(info.isa)


# Graviton4 (Neoverse V2): SVE2 at 128 bits; Graviton3 (Neoverse V1): SVE at 256 bits.
GRAVITON4 = GRAVITON3.replace("0xd40", "0xd4f").replace(" sve ", " sve sve2 ")


def test_a_pinned_march_separates_sve2_from_sve():
    """Under a pinned march torch builds SVE2 CPUs for armv9-a+sve2 (VecSVE) and SVE-only
    ones for armv8-a+sve: the same vector ISA, never one cache."""
    g3, g4 = CpuInfo.parse(GRAVITON3), CpuInfo.parse(GRAVITON4)
    assert g3.vec_isa("aarch64", None) == g4.vec_isa("aarch64", None) == "sve"
    assert g3.target("aarch64", "armv8.2-a", None) != g4.target("aarch64", "armv8.2-a", None)


def test_the_sve_vector_width_separates_targets():
    """torch compiles SVE for 128 bits where the vector length is 128, else 256
    (`-msve-vector-bits`): one CPU model at two lengths is two targets, pinned or not;
    lengths above 256 compile as 256 and share."""
    g3 = CpuInfo.parse(GRAVITON3)
    at = {bits: replace(g3, sve_bits=bits) for bits in (128, 256, 512, None)}
    for march in (None, "armv8.2-a"):
        assert at[128].target("aarch64", march, None) != at[256].target("aarch64", march, None)
        assert at[256].target("aarch64", march, None) == at[512].target("aarch64", march, None)
    assert at[None].target("aarch64", None, None)["sve_vector_bits"] == 256
    assert "sve_vector_bits" not in CpuInfo.parse(GRAVITON2).target("aarch64", None, None)
