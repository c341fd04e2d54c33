"""The fingerprint without torch: where each field comes from, what it leaves out, that it
never imports torch, and that it is at least as fine as torch's own facts (the
perturbation matrix, with fresh-node probes on the cells that match the seed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path

import pytest
from conftest import WORKLOAD, torchwarm
from factories import captured

from torchwarm.env import fingerprint
from torchwarm.errors import ConfigError
from torchwarm.seed.publish import build_manifest

SHADOW_TORCH = "raise ImportError('a shadowing torch package: never import me')\n"


def fp_json(env: dict[str, str] | None = None, *extra: str) -> dict:
    """`torchwarm fingerprint --json` in a fresh process with `env` added."""
    return json.loads(torchwarm("fingerprint", "--json", *extra, env=env).stdout)


def test_every_field_says_where_it_comes_from():
    """collect() returns exactly the fields SOURCES documents; `--sources` prints each one."""
    fields = fingerprint.collect()
    assert set(fields) == set(fingerprint.SOURCES)
    out = torchwarm("fingerprint", "--sources").stdout
    for name, source in fingerprint.SOURCES.items():
        assert f"\n{name} " in f"\n{out}" and f"from: {source}" in out


def test_reading_the_fingerprint_imports_neither_torch_nor_a_cloud_sdk():
    """A fresh process computes the fingerprint and ends with no torch, boto3, google or
    cryptography module loaded (those cost seconds on a node)."""
    code = (
        "import sys, json; from torchwarm.env import fingerprint; fingerprint.collect(); "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'boto3', 'botocore', 'google', 'cryptography', 'triton'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_a_shadowing_torch_changes_nothing(tmp_path):
    """With a `torch` package on PYTHONPATH that raises on import, the fingerprint is read
    from the installed distribution all the same."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(SHADOW_TORCH)
    plain = fp_json()
    shadowed = fp_json({"PYTHONPATH": str(tmp_path)})
    assert shadowed == plain


def test_a_second_torch_install_is_another_environment(tmp_path):
    """A torch whose files differ (its RECORD changed) or of another version is another
    environment: its dist-info, first on the path, changes the fingerprint."""
    dist = metadata.distribution("torch")
    info = Path(dist._path)  # type: ignore[attr-defined]
    copy = tmp_path / "other" / info.name
    shutil.copytree(info, copy)
    with (copy / "RECORD").open("a") as f:
        f.write("torch/_inductor/patched.py,sha256=AAAA,10\n")
    base = fp_json()
    other = fp_json({"PYTHONPATH": str(copy.parent)})
    assert other["digest"] != base["digest"]
    assert "torch_record" in fingerprint.differences(base["fields"], other["fields"])
    meta = (copy / "METADATA").read_text().replace(f"Version: {dist.version}", "Version: 9.9.9")
    (copy / "METADATA").write_text(meta)
    assert "torch" in fingerprint.differences(
        base["fields"], fp_json({"PYTHONPATH": str(copy.parent)})["fields"]
    )


class FakeNvml:
    """pynvml over a machine whose GPUs, in PCI bus order, are `models`; handles are the
    NVML index. Counts init/shutdown."""

    class NVMLError(Exception):
        pass

    def __init__(self, models: list[tuple[str, tuple[int, int]]]) -> None:
        self.models = models
        self.uuids = {f"GPU-{i:04d}": i for i in range(len(models))}
        self.open = 0

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        self.open += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.open -= 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.models)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        if not 0 <= i < len(self.models):
            raise self.NVMLError("invalid argument")
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:  # noqa: N802
        if uuid not in self.uuids:
            raise self.NVMLError("not found")
        return self.uuids[uuid]

    def nvmlDeviceGetName(self, h: int) -> bytes:  # noqa: N802
        return self.models[h][0].encode()

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:  # noqa: N802
        return self.models[h][1]


class CudaTorch:
    """A torch install that has CUDA (torch/version.py: cuda), as _gpus asks it."""

    def attr(self, name: str) -> str | None:
        return "12.8" if name == "cuda" else None


A100, L4 = ("NVIDIA A100-SXM4-80GB", (8, 0)), ("NVIDIA L4", (8, 9))


@pytest.mark.parametrize(
    "machine, env, expect",
    [
        ([A100, A100], {}, ["NVIDIA A100-SXM4-80GB sm_80"]),
        ([A100, L4], {}, ["NVIDIA A100-SXM4-80GB sm_80", "NVIDIA L4 sm_89"]),
        ([A100, L4], {"CUDA_VISIBLE_DEVICES": "GPU-0001"}, ["NVIDIA L4 sm_89"]),
        ([A100, L4], {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
         ["NVIDIA L4 sm_89"]),
        ([A100, A100, A100], {"CUDA_VISIBLE_DEVICES": "0,7,2"}, ["NVIDIA A100-SXM4-80GB sm_80"]),
        # mixed models, numbered by CUDA's own (fastest-first) order: only torch knows
        ([A100, L4], {"CUDA_VISIBLE_DEVICES": "1"}, ["from torch"]),
        ([L4, L4], {"CUDA_VISIBLE_DEVICES": "1"}, ["NVIDIA L4 sm_89"]),
        ([A100, L4], {"CUDA_VISIBLE_DEVICES": ""}, []),
    ],
)  # fmt: skip
def test_gpus_are_the_ones_cuda_would_number(monkeypatch, machine, env, expect):
    """GPUs come from NVML as CUDA_VISIBLE_DEVICES selects them (indexes up to the first
    that names no device, or UUIDs); where CUDA's numbering may not be NVML's, from torch."""
    nvml = FakeNvml(machine)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(fingerprint, "_gpus_from_torch", lambda env: ["from torch"])
    assert fingerprint._gpus(CudaTorch(), env) == expect  # type: ignore[arg-type]
    assert nvml.open == 0


def test_gpus_from_torch_ask_a_child_with_the_given_env(tmp_path):
    """torch's answer comes from a child process that has the fingerprint's env (CPU build
    here: no GPU); a torch that cannot start there is one ConfigError line."""
    assert fingerprint._gpus_from_torch(dict(os.environ)) == []
    broken = tmp_path / "torch"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('broken torch')\n")
    with pytest.raises(ConfigError, match="cannot list the GPUs through torch"):
        fingerprint._gpus_from_torch({**os.environ, "PYTHONPATH": str(tmp_path)})


def test_compile_env_keeps_settings_and_leaves_out_places_and_credentials():
    """Kept: TORCH_COMPILE_JOB_ID and TORCHINDUCTOR_* settings (torch keys them), a path as
    its digest. Left out: the cache location and switches, connections and credentials."""
    env = {
        "TORCH_COMPILE_JOB_ID": "serve-v3",
        "TORCHINDUCTOR_FREEZING": "1",
        "TORCHINDUCTOR_CPP_MARCH": "x86-64-v3",
        "TORCHINDUCTOR_WORKER_LOGPATH": "/var/log/inductor",
        "TORCHINDUCTOR_REDIS_URL": "redis://:hunter2@cache.internal:6379",
        "TORCHINDUCTOR_REDIS_HOST": "cache.internal",
        "TORCHINDUCTOR_AUTOTUNE_REMOTE_CACHE": "1",
        "TORCHINDUCTOR_CACHE_DIR": "/var/cache/torchwarm/inductor",
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_COMPILE_THREADS": "16",
        "HOME": "/root",
    }
    got = fingerprint.compile_env(env)
    assert set(got) == {"TORCH_COMPILE_JOB_ID", "TORCHINDUCTOR_CPP_MARCH",
                        "TORCHINDUCTOR_FREEZING", "TORCHINDUCTOR_WORKER_LOGPATH"}  # fmt: skip
    assert got["TORCHINDUCTOR_FREEZING"] == "1"
    assert got["TORCHINDUCTOR_WORKER_LOGPATH"].startswith("sha256:")
    assert "/var/log" not in json.dumps(got)


class RecordingEnv(Mapping[str, str]):
    """An environment that records the name of every variable whose value is read."""

    def __init__(self, data: dict[str, str]) -> None:
        self.data, self.read = data, set[str]()

    def __getitem__(self, name: str) -> str:
        self.read.add(name)
        return self.data[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def test_collect_reads_no_variable_outside_the_declared_ones():
    """collect() reads the value of no environment variable that env_fields() does not
    declare (a seed decides from that declaration whether `env` changes the fingerprint)."""
    env = RecordingEnv({**os.environ, "OMP_NUM_THREADS": "3", "TORCHINDUCTOR_FREEZING": "1",
                        "TORCHINDUCTOR_COMPILE_THREADS": "8", "APP_TOKEN": "x"})  # fmt: skip
    fingerprint.collect(env)  # type: ignore[arg-type]
    assert {"OMP_NUM_THREADS", "TORCHINDUCTOR_FREEZING"} <= env.read
    assert sorted(k for k in env.read if not fingerprint.env_fields(k)) == []


@pytest.mark.parametrize(
    ("name", "value"),
    [("OMP_NUM_THREADS", "3"), ("MKL_NUM_THREADS", "3"), ("ATEN_CPU_CAPABILITY", "default"),
     ("TORCHINDUCTOR_CPP_MARCH", "x86-64-v3"), ("TORCH_COMPILE_JOB_ID", "job-1"),
     ("TORCHINDUCTOR_FREEZING", "1")],
)  # fmt: skip
def test_a_declared_variable_changes_only_the_fields_declared_for_it(name, value):
    """Setting a declared variable changes the fingerprint, in fields env_fields() names."""
    base = {k: v for k, v in os.environ.items() if k != name}
    changed = fingerprint.differences(fingerprint.collect(base),
                                      fingerprint.collect({**base, name: value}))  # fmt: skip
    assert changed and set(changed) <= set(fingerprint.env_fields(name)), changed


def test_left_out_settings_are_not_declared():
    """The cache location and switches, the compile thread count and credentials are not
    variables the fingerprint reads."""
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE",
                 "TORCHINDUCTOR_COMPILE_THREADS", "TORCHINDUCTOR_REDIS_URL", "HOME"):  # fmt: skip
        assert fingerprint.env_fields(name) == (), name


def test_no_credential_reaches_a_manifest(tmp_path):
    """A seed whose environment holds a Redis URL with a password (and a signing key)
    publishes manifests that contain neither."""
    env = {
        "TORCHINDUCTOR_REDIS_URL": "redis://:hunter2@cache.internal:6379",
        "TORCHINDUCTOR_AUTOTUNE_REMOTE_CACHE": "redis://:hunter2@cache.internal:6380",
        "TORCHINDUCTOR_FUTURE_OPTION": "https://user:hunter2@example.com/x",
        "TORCHWARM_SIGNING_KEY": "seed-1:c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=",
        "OMP_NUM_THREADS": "hunter2",
    }
    fields = fingerprint.collect(environ=env)
    m, _ = build_manifest("mlp", fields, "cachedir", [captured(tmp_path, "cachedir", b"x")], {})
    text = m.to_json().decode()
    assert "hunter2" not in text and "c2VjcmV0" not in text and "redis" not in text


# -- against torch itself ---------------------------------------------------------------

# Cells of the perturbation matrix: environment added to the seed's.
CELLS: dict[str, dict[str, str]] = {
    "base": {},
    "omp1": {"OMP_NUM_THREADS": "1"},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten-avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "march-v3": {"TORCHINDUCTOR_CPP_MARCH": "x86-64-v3"},
    "freezing": {"TORCHINDUCTOR_FREEZING": "1"},
    "job-id": {"TORCH_COMPILE_JOB_ID": "job-a"},
    "redis": {"TORCHINDUCTOR_REDIS_URL": "redis://:pw@cache.internal:6379"},
    "worker-log": {"TORCHINDUCTOR_WORKER_LOGPATH": "/tmp/inductor-workers.log"},
    "second-torch": {},  # PYTHONPATH: a copy of torch's dist-info with another RECORD
}


def torch_view(facts: dict) -> dict:
    """torch's facts that decide a hit (where torch lives is in include_layout already)."""
    return {k: v for k, v in facts.items() if k != "torch_dir"}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict[str, tuple[str, dict, dict]]:
    """cell -> (our digest, our fields, torch's facts), each read in a fresh process."""
    second = tmp_path_factory.mktemp("second-torch")
    info = Path(metadata.distribution("torch")._path)  # type: ignore[attr-defined]
    shutil.copytree(info, second / info.name)
    with (second / info.name / "RECORD").open("a") as f:
        f.write("torch/_inductor/patched.py,sha256=AAAA,10\n")
    probe = tmp_path_factory.mktemp("isa-probe")  # torch's ISA probe, built once per ISA
    code = (
        "import json, sys; from pathlib import Path; from torchwarm.env import fingerprint as f; "
        "fields = f.collect(); print(json.dumps([f.digest(fields), fields, "
        "f.torch_facts(Path(sys.argv[1]))]))"
    )
    out = {}
    for name, env in CELLS.items():
        env = {**env, "PYTHONPATH": str(second)} if name == "second-torch" else env
        proc = subprocess.run([sys.executable, "-c", code, str(probe)], capture_output=True,
                              text=True, check=True, env={**os.environ, **env})  # fmt: skip
        digest, fields, facts = json.loads(proc.stdout.strip().splitlines()[-1])
        out[name] = (digest, fields, torch_view(facts))
    return out


@pytest.mark.compile
def test_wherever_torchs_facts_differ_the_fingerprint_differs(matrix):
    """For every pair of cells: torch's own facts (torch_key, vector ISA and its flags,
    -march, inductor settings, threads, versions, GPUs) differ ⇒ the digests differ."""
    names = sorted(matrix)
    checked = 0
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if matrix[a][2] != matrix[b][2]:
                assert matrix[a][0] != matrix[b][0], f"{a} and {b}: torch differs, we do not"
                checked += 1
    assert checked >= 10
    # A Redis URL (no code setting) splits nothing; a log path splits as torch does.
    assert matrix["redis"][0] == matrix["base"][0]
    assert matrix["worker-log"][2] != matrix["base"][2]


@pytest.mark.compile
def test_every_cell_that_matches_the_seed_hits_on_a_fresh_node(matrix, seed, node_factory):
    """A node in each cell whose fingerprint equals the seed's pulls the seed's cache and its
    probe hits every graph with zero misses; the others resolve nothing and start cold."""
    seed_digest = fingerprint.digest(
        json.loads((seed.out("cachedir") / "mlp" / "warmup.json").read_text())["fingerprint"]
    )
    assert matrix["base"][0] == seed_digest
    matching = [n for n, (d, _, _) in matrix.items() if d == seed_digest and n != "second-torch"]
    assert {"base", "redis"} <= set(matching)
    for name in matching:
        node = node_factory(name=name)
        env = CELLS[name]
        assert "warm: mlp" in node.pull("--require", env=env).stdout
        report = node.probe(env=env)
        c = report["counters"]
        assert report["cache_dir"] == str(node.cache_dir)
        assert c["fxgraph_cache_miss"] == 0 and c["fxgraph_cache_hit"] == len(WORKLOAD["inputs"])
    other = node_factory(name="omp1-node")
    assert "starting cold" in other.pull(env=CELLS["omp1"]).stdout


@pytest.mark.compile
def test_pull_works_with_torch_unimportable(node_factory, tmp_path):
    """A node agent whose `torch` raises on import pulls a cachedir cache all the same, with
    the fingerprint it has without the shadow, and the app (real torch) then hits."""
    shadow = tmp_path / "shadow"
    (shadow / "torch").mkdir(parents=True)
    (shadow / "torch" / "__init__.py").write_text(SHADOW_TORCH)
    node = node_factory()
    out = node.pull("--require", "--json", env={"PYTHONPATH": str(shadow)})
    report = json.loads(out.stdout)
    assert report["status"] == "warm"
    assert report["fingerprint"] == fp_json()["digest"]
    probe = node.probe()
    assert probe["counters"]["fxgraph_cache_miss"] == 0


def test_fingerprint_cli_runs_in_a_clean_environment():
    """`torchwarm fingerprint` needs no TORCHINDUCTOR_CACHE_DIR and writes nothing there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR")}
    proc = subprocess.run([sys.executable, "-m", "torchwarm.cli", "fingerprint"], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0 and "digest" in proc.stdout


def test_torchs_isa_probe_is_built_in_a_private_folder(tmp_path):
    """`fingerprint --torch` lets torch build and load its ISA-probe library only in a fresh
    folder of this user's, mode 0700, never in a predictable shared one that another user
    created first (here: the name an older torchwarm used, owned by uid 4242)."""
    planted = tmp_path / f"torchwarm-isa-probe-{os.getuid()}"
    planted.mkdir()
    (planted / "planted.so").write_bytes(b"not a library")
    if os.geteuid() == 0:
        os.chown(planted, 4242, 4242)
    before = sorted(p.name for p in planted.iterdir()), planted.stat().st_mtime_ns
    code = textwrap.dedent("""
        import json, os, stat, sys, tempfile
        tempfile.tempdir = sys.argv[1]
        import torch._inductor.cpu_vec_isa as isa
        from torchwarm.env import fingerprint
        seen = {}
        real = isa.pick_vec_isa
        def spy():
            d = os.environ["TORCHINDUCTOR_CACHE_DIR"]
            st = os.stat(d)
            seen.update(dir=d, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid)
            return real()
        isa.pick_vec_isa = spy
        fingerprint.torch_facts()
        print(json.dumps(seen))
    """)
    env = {**os.environ, "HOME": str(tmp_path / "no-home"), "XDG_CACHE_HOME": "/proc/none"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(seen["dir"]).parent == tmp_path and Path(seen["dir"]) != planted
    assert seen["mode"] == 0o700 and seen["uid"] == os.getuid()
    assert (sorted(p.name for p in planted.iterdir()), planted.stat().st_mtime_ns) == before
    assert not Path(seen["dir"]).exists()  # removed afterwards
