"""End to end on the local store: seed capture → push → a fresh node process pulls and compiles.

Every claim about a hit is read from torch's counters in a new process whose cache dir
held nothing before the pull.
"""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import WORKLOAD, torchwarm

pytestmark = pytest.mark.compile

N_SETS = len(WORKLOAD["inputs"])


def _blob_paths(store):
    """The blob files of a local store (not its lock files)."""
    return sorted(p for p in (store / "blobs").rglob("*") if p.is_file() and len(p.name) == 64)


@pytest.mark.parametrize("fmt", ["cachedir", "megacache"])
def test_fresh_node_hits_every_cache_and_compiles_no_kernel(node_factory, fmt):
    """A new process with an empty cache dir, after pull, hits FX-graph and AOTAutograd caches."""
    node = node_factory(fmt)
    assert not node.cache_dir.exists()
    out = node.pull("--require")
    assert "warm: mlp" in out.stdout
    report = node.probe()
    assert report["cache_dir"] == str(node.cache_dir)  # the probe read the node's cache
    c = report["counters"]
    assert c["fxgraph_cache_hit"] == N_SETS and c["fxgraph_cache_miss"] == 0
    assert c["autograd_cache_hit"] == N_SETS and c["autograd_cache_miss"] == 0
    assert report["new_so_files"] == 0  # both formats carry the CPU kernels
    assert all(s["max_abs_diff"] < 1e-4 for s in report["input_sets"])


def test_control_an_unpulled_node_misses_every_cache(node_factory):
    """The control for the hit tests: the same probe on an empty, un-pulled cache dir misses
    every graph and compiles kernels, so a hit above is the pull's doing."""
    node = node_factory()
    report = node.probe()
    assert report["cache_dir"] == str(node.cache_dir)
    c = report["counters"]
    assert c["fxgraph_cache_hit"] == 0 and c["fxgraph_cache_miss"] == N_SETS
    assert c["autograd_cache_hit"] == 0 and report["new_so_files"] > 0


def test_ready_marker_names_what_was_installed(node_factory):
    """The marker is JSON naming the workload, its blob digests and the timings."""
    node = node_factory()
    node.pull()
    doc = json.loads(node.marker.read_text())
    assert doc["status"] == "warm"
    (w,) = doc["workloads"]
    stored = {p.name for p in _blob_paths(node.store)}
    assert {b["sha256"] for b in w["blobs"]} == stored
    assert doc["timings"]["total_s"] > 0


@pytest.mark.parametrize(
    ("env", "field"),
    [({"OMP_NUM_THREADS": "1"}, "threads"), ({"ATEN_CPU_CAPABILITY": "default"}, "cpu_vec_isa")],
)
def test_node_with_another_fingerprint_starts_cold(node_factory, env, field):
    """Another thread count or vector ISA resolves nothing, installs nothing, and says why."""
    node = node_factory()
    out = node.pull(env=env)
    assert out.returncode == 0
    assert "starting cold" in out.stdout and field in out.stdout
    assert not node.cache_dir.exists()
    assert json.loads(node.marker.read_text())["status"] == "cold"


def test_node_with_another_fingerprint_fails_closed_with_require(node_factory):
    """With --require the same miss exits 5 with one line on stderr."""
    node = node_factory()
    out = node.pull("--require", env={"OMP_NUM_THREADS": "1"}, check=False)
    assert out.returncode == 5
    assert len(out.stderr.strip().splitlines()) == 1 and "threads" in out.stderr
    assert not node.cache_dir.exists() and not node.marker.exists()


def test_corrupted_blob_is_refused_and_nothing_installed(node_factory):
    """One flipped byte in the stored blob: the pull refuses it, installs nothing, one line."""
    node = node_factory()
    (blob,) = _blob_paths(node.store)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    out = node.pull(check=False)
    assert out.returncode == 0  # fail-open: start cold
    assert "starting cold" in out.stdout and "sha256" in out.stdout
    assert not node.cache_dir.exists()
    closed = node.pull("--require", check=False)
    assert closed.returncode == 4
    lines = closed.stderr.strip().splitlines()
    assert len(lines) == 1 and "sha256" in lines[0] and "refusing" in lines[0]
    assert not node.cache_dir.exists()


def test_probe_counts_each_workload_on_its_own(node_factory):
    """Two workloads probed in one process: each line counts its own hits (not the running
    total) and the second is not disturbed by the first's compiled code."""
    node = node_factory()
    node.pull("--require")
    doc = yaml.safe_load(node.config.read_text())
    doc["workloads"] = [WORKLOAD, {**WORKLOAD, "name": "mlp-again"}]
    both = node.config.with_name("both.yaml")
    both.write_text(yaml.safe_dump(doc))
    out = torchwarm("probe", "-c", str(both), "--json")
    reports = [json.loads(line) for line in out.stdout.strip().splitlines()[-2:]]
    for r in reports:
        assert r["counters"]["fxgraph_cache_hit"] == N_SETS
        assert r["counters"]["fxgraph_cache_miss"] == 0
