"""Pushes and pulls SIGKILLed at random write-path calls (tests/crash.py random-*), 20 trials each.

Each trial dies at a call number drawn from a fixed seed; a point past the end of the run
lets it finish normally. Both outcomes are counted; most trials must really be killed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from torchwarm import archive, config, keys, node, verify
from torchwarm import manifest as mf
from torchwarm import warmup as wu
from torchwarm.publish import build_manifest, publish
from torchwarm.stores.local import LocalStore

pytestmark = pytest.mark.compile

CRASH = Path(__file__).with_name("crash.py")
TRIALS = 20


def crash(mode: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run crash.py; it must die by SIGKILL or finish cleanly, nothing else."""
    proc = subprocess.run(
        [sys.executable, str(CRASH), mode, "--", *args], capture_output=True, text=True
    )
    assert proc.returncode in (0, -9), f"{mode}: exit {proc.returncode}\n{proc.stderr}"
    return proc


def points(proc: subprocess.CompletedProcess[str]) -> int:
    found = re.search(r"crash points: (\d+)", proc.stderr)
    assert found and proc.returncode == 0, proc.stderr
    return int(found[1])


def tree(root: Path) -> dict[str, bytes] | None:
    """Every file under `root` with its bytes; None when `root` does not exist."""
    if not root.exists():
        return None
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def assert_store_consistent(root: Path) -> int:
    """Every manifest in the local store parses and names blobs present with their digest."""
    store = LocalStore(root)
    found = 0
    for info in store.list("manifests/"):
        m = mf.parse(store.read(info.key, mf.MAX_MANIFEST_BYTES), info.key)
        for b in m.blobs:
            assert verify.file_sha256(root / keys.blob_key(b.sha256)) == (b.sha256, b.size)
        found += 1
    return found


def test_push_killed_at_random_points_leaves_the_store_consistent(seed, tmp_path):
    """20 pushes killed at random write-path calls never leave a manifest without its blobs."""
    results = {f: wu.WarmupResult.load(seed.out(f) / "mlp") for f in ("cachedir", "megacache")}
    cfg = tmp_path / "c.yaml"
    upper = {}
    for fmt in results:  # calibrate: the write-path calls of a full push of each format
        store = tmp_path / f"calibrate-{fmt}"
        cfg.write_text(f"store: {store.as_uri()}\ncache_dir: {tmp_path / 'unused'}\n")
        upper[fmt] = points(crash("random-push:count:0", "push", "-c", str(cfg),
                                  "--from", str(seed.out(fmt))))  # fmt: skip
    killed, with_manifest = 0, 0
    for i in range(TRIALS):
        fmt = ("cachedir", "megacache")[i % 2]
        store = tmp_path / f"store{i}"
        cfg.write_text(f"store: {store.as_uri()}\ncache_dir: {tmp_path / 'unused'}\n")
        proc = crash(f"random-push:{i}:{upper[fmt] + 1}", "push", "-c", str(cfg),
                     "--from", str(seed.out(fmt)))  # fmt: skip
        killed += proc.returncode == -9
        with_manifest += assert_store_consistent(store) if store.exists() else 0
        r = results[fmt]  # the next push completes the job
        m, files = build_manifest(r.workload, r.fingerprint, r.format, r.captured, r.summary)
        assert publish(LocalStore(store), m, files).outcome in ("published", "unchanged")
        assert assert_store_consistent(store) == 1
    assert killed >= TRIALS * 3 // 4, killed
    assert 0 < with_manifest < killed  # deaths landed both before and after the manifest


def test_pull_killed_at_random_points_leaves_cache_untouched_or_complete(
    seed, node_factory, tmp_path
):
    """20 pulls killed at random write-path calls leave the cache dir as it was or complete."""
    n = node_factory()
    cfg = config.load(n.config)
    expected = tmp_path / "expected"
    archive.extract(seed.out("cachedir") / "mlp" / "cachedir.tar.zst", expected)
    seed_tree = tree(expected)
    workdir = n.cache_dir.parent / f".{n.cache_dir.name}.torchwarm"
    upper: dict[bool, int] = {}
    killed = 0
    for i in range(TRIALS):
        earlier = i % 2 == 1  # odd trials: a cache dir with entries from an earlier boot
        shutil.rmtree(n.cache_dir, ignore_errors=True)
        if earlier:
            (n.cache_dir / "fxgraph" / "old").mkdir(parents=True)
            (n.cache_dir / "fxgraph" / "old" / "entry").write_bytes(b"earlier %d" % i)
            (n.cache_dir / "earlier-entry").write_bytes(b"from a previous boot")
        before = tree(n.cache_dir)
        full = {**(before or {}), **seed_tree}
        if earlier not in upper:  # the first trial of each kind calibrates (a full pull)
            upper[earlier] = points(crash("random-pull:count:0", "pull", "-c", str(n.config)))
        else:
            proc = crash(f"random-pull:{i}:{upper[earlier] + 1}", "pull", "-c", str(n.config))
            killed += proc.returncode == -9
        after = tree(n.cache_dir)
        assert after in (before, full), f"trial {i}: a partial tree"
        if n.marker.exists():
            assert after == full
        report = node.pull(cfg, require=True)  # a later clean pull completes
        assert report.status == "warm" and tree(n.cache_dir) == full
        assert not [p for p in workdir.iterdir() if p.name.split("-")[0] in
                    ("staging", "previous", "downloads")]  # fmt: skip
    assert killed >= (TRIALS - 2) * 3 // 4, killed
