"""Pushes and pulls SIGKILLed at random write-path calls (tests/crash.py random-*).

Push: 20 trials on a local folder. Pull: 20 trials per store (a local folder and
SeaweedFS), of which 2 calibrate (count the write-path calls of a full pull) and 18 die.
Each trial dies at a call number drawn from a fixed seed; a point past the end of the run
lets it finish normally. Both outcomes are counted; most trials must really be killed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import WORKLOAD
from factories import seed_files, tree
from servers import BUCKET, FAKE_AWS_ENV, fake_aws_env, s3_options

from torchwarm import config
from torchwarm.node import gate as node
from torchwarm.node import verify
from torchwarm.seed import warmup as wu
from torchwarm.seed.publish import build_manifest, publish
from torchwarm.spec import keys
from torchwarm.spec import manifest as mf
from torchwarm.stores import open_store
from torchwarm.stores.local import LocalStore

pytestmark = pytest.mark.compile

CRASH = Path(__file__).with_name("crash.py")
TRIALS = 20


def crash(mode: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run crash.py (with this process's environment); it must die by SIGKILL or finish
    cleanly, nothing else."""
    proc = subprocess.run(
        [sys.executable, str(CRASH), mode, "--", *args],
        capture_output=True,
        text=True,
        start_new_session=True,  # death takes the pull's worker too (crash.die)
    )
    assert proc.returncode in (0, -9), f"{mode}: exit {proc.returncode}\n{proc.stderr}"
    return proc


def points(proc: subprocess.CompletedProcess[str]) -> int:
    found = re.search(r"crash points: (\d+)", proc.stderr)
    assert found and proc.returncode == 0, proc.stderr
    return int(found[1])


def tree_or_none(root: Path) -> dict[str, bytes] | None:
    """Every file under `root` with its bytes; None when `root` does not exist."""
    return tree(root) if root.exists() else None


def assert_store_consistent(root: Path) -> int:
    """Every manifest in the local store parses and names blobs present with their digest."""
    store = LocalStore(root)
    found = 0
    for info in store.list("manifests/"):
        m = mf.parse(store.read(info.key, mf.MAX_MANIFEST_BYTES).data, info.key)
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


@pytest.fixture(params=["local", "seaweedfs"])
def kill_node(request, seed, node_factory, tmp_path) -> tuple[Path, Path, dict[str, str]]:
    """(config, cache dir, environment) of a node whose store holds the seed's cachedir
    capture: a local folder, or a fresh SeaweedFS prefix."""
    if request.param == "local":
        n = node_factory()
        return n.config, n.cache_dir, {}
    server = request.getfixturevalue("seaweedfs_server")
    r = wu.WarmupResult.load(seed.out("cachedir") / "mlp")
    m, files = build_manifest(r.workload, r.fingerprint, r.format, r.captured, r.summary)
    url = f"s3://{BUCKET}/kill-{uuid.uuid4().hex[:12]}"
    options = s3_options(server.endpoint, request_checksum_calculation="when_required")
    with pytest.MonkeyPatch.context() as mp:
        fake_aws_env(mp)
        publish(open_store(url, options), m, files)
    cache_dir = tmp_path / "s3node" / "cache" / "inductor"
    doc = {"store": url, "cache_dir": str(cache_dir), "workloads": [WORKLOAD],
           "store_options": {"endpoint_url": server.endpoint, "path_style": True,
                             "region": "us-east-1",
                             "request_checksum_calculation": "when_required"}}  # fmt: skip
    config_path = tmp_path / "s3node" / "c.yaml"
    config_path.parent.mkdir(parents=True)
    config_path.write_text(yaml.safe_dump(doc))
    return config_path, cache_dir, FAKE_AWS_ENV


def test_pull_killed_at_random_points_leaves_cache_untouched_or_complete(seed, kill_node, tmp_path):
    """20 pulls (2 calibrate, 18 killed at random write-path calls) leave the cache dir as it
    was or complete, on a local folder and on SeaweedFS."""
    config_path, cache_dir, env = kill_node
    marker = cache_dir.parent / "torchwarm-ready.json"
    seed_tree = seed_files(seed.out("cachedir") / "mlp" / "cache")
    workdir = cache_dir.parent / f".{cache_dir.name}.torchwarm"
    upper: dict[bool, int] = {}
    killed = 0
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        cfg = config.load(config_path)
        for i in range(TRIALS):
            earlier = i % 2 == 1  # odd trials: a cache dir with entries from an earlier boot
            shutil.rmtree(cache_dir, ignore_errors=True)
            if earlier:
                (cache_dir / "fxgraph" / "old").mkdir(parents=True)
                (cache_dir / "fxgraph" / "old" / "entry").write_bytes(b"earlier %d" % i)
                (cache_dir / "earlier-entry").write_bytes(b"from a previous boot")
            before = tree_or_none(cache_dir)
            full = seed_tree  # an install yields exactly the manifest's tree
            if earlier not in upper:  # the first trial of each kind calibrates (a full pull)
                upper[earlier] = points(crash("random-pull:count:0", "pull", "-c",
                                              str(config_path)))  # fmt: skip
            else:
                proc = crash(f"random-pull:{i}:{upper[earlier] + 1}", "pull", "-c",
                             str(config_path))  # fmt: skip
                killed += proc.returncode == -9
            after = tree_or_none(cache_dir)
            assert after in (before, full), f"trial {i}: a partial tree"
            if marker.exists():
                assert after == full
            report = node.pull(cfg, require=True)  # a later clean pull completes
            assert report.status == "warm" and tree(cache_dir) == full
            assert not [p for p in workdir.iterdir() if p.name.split("-")[0] in
                        ("staging", "previous", "downloads")]  # fmt: skip
    assert killed >= (TRIALS - 2) * 3 // 4, killed
