"""The miss watcher without compiling: which paths are entries, what is counted, what is said.

The paths are the ones torch 2.13 wrote into a node's cache dir in the measurements behind
node/misses.py (hits: locks, and with megacache output code and kernel sources; misses: FX-graph
and AOTAutograd entries, output code, a `.main.so` kernel).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from factories import make_tree

from torchwarm.node import misses, sidecar
from torchwarm.node.report import PullReport, WorkloadOutcome

FX = "fxgraph/gm/fgmdokgq7pl4fsyji264lpxnclmt/xrk5njfgmvhs25ze5p6t3pj7cf7tf"
AOT = "aotautograd/a242pfs3yfdb4jfpdl34l4ls2ail3a/agsmio6osdp7f7elwlrnhmnty6b"
KERNEL = "e3/ce3moi5a4bv76fnid7r6xt67ncnmclgjem5iyoh5.main.so"
DYNAMO = "dynamo/" + "0f" * 32 + "/entry"
TRITON = "triton/0/6ZK2YBWVV4EKJ3BP/__grp__triton_poi_fused_0.json"

ENTRIES = {FX: "fxgraph", AOT: "aotautograd", KERNEL: "cpu_kernel", DYNAMO: "dynamo",
           TRITON: "triton_kernel"}  # fmt: skip
NOT_ENTRIES = [
    "locks/ce3moi5a4bv76fnid7r6xt67ncnmclgjem5iyoh5.lock",  # every hit
    "d6/cd6745rqskqbqgt5z6np3zetu7ua3ci2c36eecr.py",  # output code (megacache hits too)
    "e3/ce3moi5a4bv76fnid7r6xt67ncnmclgjem5iyoh5.main.cpp",  # kernel source
    "3g/c3g2mqobe6g24e353lemr6cpzfcmocdsk5rbq3m.so",  # torch's CPU ISA check
    "3g/c3g2mqobe6g24e353lemr6cpzfcmocdsk5rbq3m.cpp",
    "fxgraph/gm/fgmdokgq7pl4fsyji264lpxnclmt/.1234.5678.tmp",  # write_atomic in flight
    "e3/.1234.5678.tmp",
    "dynamo/code_state___main__.pkl",  # Dynamo's automatic-dynamic profile
    "dynamo/code_state___main__.pkl.lock",
    "triton/0/tmp.pid_12_3456/__grp__triton_poi_fused_0.json",  # Triton writing
    "triton/0/tmp.123456/__grp__triton_poi_fused_0.json",  # torch's bundler writing
    "triton/0/6ZK2YBWVV4EKJ3BP/triton_poi_fused_0.cubin",  # a kernel's other files
    "triton/0/6ZK2YBWVV4EKJ3BP.lock",
    "bx/dc700ba22795ea2a794f09fe85d5cb34e32aa7c4f93a5837039dba0bbdaf.best_config",  # autotuning
    ".torchwarm-installed.json",
    "fxgraph/stray",
]


@pytest.mark.parametrize("rel", sorted(ENTRIES))
def test_entries_are_classified_by_kind(rel):
    """Each kind of compile entry torch writes on a miss has its kind."""
    assert misses.classify(rel) == ENTRIES[rel]


@pytest.mark.parametrize("rel", NOT_ENTRIES)
def test_what_torch_writes_on_a_hit_is_not_an_entry(rel):
    """Locks, files in flight, output code, sources, profiles and ISA checks are not entries."""
    assert misses.classify(rel) is None


def test_scan_visits_only_folders_that_hold_entries(tmp_path):
    """A scan finds every entry and nothing under locks/, temp or unrelated folders."""
    files = {rel: b"x" for rel in [*ENTRIES, *NOT_ENTRIES]}
    files["elsewhere/ab/c.main.so"] = b"x"  # not a shard at the top: not a kernel
    make_tree(tmp_path, files)
    assert misses.scan(tmp_path) == ENTRIES
    assert misses.scan(tmp_path / "absent") == {}


def test_triton_kernels_are_not_counted_after_a_megacache_install():
    """torch's bundler writes Triton kernels on FX-graph hits after a megacache install."""
    assert "triton_kernel" in misses.counted_kinds(["cachedir", "precompile"])
    assert "triton_kernel" not in misses.counted_kinds(["cachedir", "megacache"])
    assert "fxgraph" in misses.counted_kinds(["megacache"])


def watcher(root: Path, lines: list[str], **kw) -> misses.Watcher:
    return misses.Watcher(root, say=lines.append, interval_s=0.05, **kw)


def test_only_entries_after_the_baseline_count_one_line_per_kind(tmp_path):
    """Entries present at the baseline never count; new ones count; one line per kind."""
    make_tree(tmp_path, {FX: b"x", KERNEL: b"x"})
    lines: list[str] = []
    w = watcher(tmp_path, lines)
    w.baseline()
    make_tree(tmp_path, {FX + "2": b"x", FX.replace("gm/", "zz/"): b"x", AOT: b"x",
                         "locks/k.lock": b"", "e3/.1.2.tmp": b""})  # fmt: skip
    w.poll()
    w.poll()  # entries already counted are not counted again
    counts, scans, _, _ = w.snapshot()
    assert counts == {"fxgraph": 2, "aotautograd": 1, "dynamo": 0, "cpu_kernel": 0,
                      "triton_kernel": 0}  # fmt: skip
    assert scans == 3
    assert len(lines) == 2
    fx_line = next(line for line in lines if line.startswith("miss (fxgraph): "))
    assert "did not cover" in fx_line and str(tmp_path) in fx_line
    assert "add the input set" in fx_line and 'kind="fxgraph"' in fx_line


def test_a_cache_dir_the_app_creates_is_watched(tmp_path):
    """A node that started cold has no cache dir at the baseline; the app's entries count."""
    root = tmp_path / "inductor"
    lines: list[str] = []
    w = watcher(root, lines, note=" (the pull left mlp cold)")
    w.baseline()
    make_tree(root, {KERNEL: b"x"})
    w.poll()
    assert w.snapshot()[0]["cpu_kernel"] == 1
    assert lines[0].startswith("miss (cpu_kernel): ") and "(the pull left mlp cold)" in lines[0]


def test_kinds_left_out_are_neither_counted_nor_said(tmp_path):
    """A kind not counted (Triton after a megacache install) has no sample and no line."""
    lines: list[str] = []
    w = watcher(tmp_path, lines, kinds=misses.counted_kinds(["megacache"]))
    w.baseline()
    make_tree(tmp_path, {TRITON: b"x"})
    w.poll()
    assert "triton_kernel" not in w.snapshot()[0] and lines == []


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_an_error_stops_the_watcher_with_one_line_and_keeps_the_counts(tmp_path):
    """A scan that fails (the cache dir became a file) says one line and stops watching."""
    root = tmp_path / "inductor"
    make_tree(root, {"locks/k.lock": b""})
    lines: list[str] = []
    w = watcher(root, lines).start()
    assert w.snapshot()[3]  # watching
    make_tree(root, {FX: b"x"})
    wait_for(lambda: w.snapshot()[0]["fxgraph"] == 1)
    shutil.rmtree(root)
    root.write_bytes(b"not a folder")
    wait_for(lambda: not w.snapshot()[3])
    assert lines[-1].startswith("miss watcher stopped: NotADirectoryError")
    assert len([line for line in lines if "stopped" in line]) == 1
    assert w.snapshot()[0]["fxgraph"] == 1


def report(cache_dir: str, *outcomes: WorkloadOutcome) -> PullReport:
    status = "warm" if all(o.status == "warm" for o in outcomes) else "partial"
    return PullReport(status, cache_dir, "fp", "store", list(outcomes), {"total_s": 0.1})


def test_sidecar_exports_the_counts(tmp_path):
    """/metrics carries a counter per kind, whether the watcher runs, and its scans."""
    state = sidecar.Sidecar()
    assert "torchwarm_miss_watch_up 0" in state.metrics()[2].decode()
    state.report = report(str(tmp_path), WorkloadOutcome("mlp", "warm", format="cachedir"))
    state.watcher = misses.watch(state.report, interval_s=0.05)
    assert state.watcher is not None
    make_tree(tmp_path, {AOT: b"x"})
    wait_for(lambda: state.watcher.snapshot()[0]["aotautograd"] == 1)
    text = state.metrics()[2].decode()
    state.watcher.stop()
    assert 'torchwarm_cache_misses_total{kind="aotautograd"} 1' in text
    assert 'torchwarm_cache_misses_total{kind="fxgraph"} 0' in text
    assert "torchwarm_miss_watch_up 1" in text
    assert "# TYPE torchwarm_cache_misses_total counter" in text


def test_a_pull_without_a_cache_dir_is_not_watched():
    """A config that did not load may leave no cache dir: nothing to watch, no error."""
    assert misses.watch(report("", WorkloadOutcome("mlp", "cold", "config error"))) is None


def test_lines_say_which_workloads_the_pull_left_cold(tmp_path, capsys):
    """After a partial pull the line names the cold workloads: their compiles are all misses."""
    rep = report(str(tmp_path), WorkloadOutcome("mlp", "warm", format="cachedir"),
                 WorkloadOutcome("big", "cold", "no cache for this fingerprint"))  # fmt: skip
    w = misses.watch(rep, interval_s=0.05)
    assert w is not None
    make_tree(tmp_path, {FX: b"x"})
    wait_for(lambda: w.snapshot()[0]["fxgraph"] == 1)
    w.stop()
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("miss (fxgraph): ")
    assert "(the pull left big cold: each of their compiles is a miss)" in line
