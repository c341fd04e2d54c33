"""Hostile or broken cache volumes (#20): a cache_dir that is not a folder, files a refused
source planted, leftovers no recursive walk can delete, a worker killed mid-unpack. Claims
about what a node does are checked with fresh `pull` processes; nothing is compiled."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from conftest import WORKLOAD, torchwarm
from factories import inject_env, make_tree, tree
from synthetic import capture, node_fingerprint

from torchwarm.node import install
from torchwarm.seed.publish import build_manifest, now_us, publish
from torchwarm.spec import keys, signing
from torchwarm.spec.manifest import Manifest
from torchwarm.stores.local import LocalStore
from torchwarm.util import fs
from torchwarm.util.fs import remove_tree

GOOD = {"fxgraph/ab/fabc/entry": b"genuine graph", "3g/kernel.so": b"genuine kernel"}
PLANTED = {"fxgraph": b"a file where torch keeps a folder", "zz/planted.py": b"import os"}
YEAR_2100_US = 4_102_444_800 * 10**6


@pytest.fixture(scope="module")
def seed_key() -> signing.SigningKey:
    return signing.load_secret(signing.generate("seed-1")[0], "test")


class Volume:
    """A store and a node's cache volume, with fresh `pull` processes."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = LocalStore(tmp / "store")
        self.cache_dir = tmp / "volume" / "inductor"
        self.marker = tmp / "volume" / "torchwarm-ready.json"
        self.n = 0

    def publish(self, files: dict[str, bytes], workload: str = "mlp",
                key: signing.SigningKey | None = None,
                serial: int | None = None) -> Manifest:  # fmt: skip
        """Publish `files` as `workload`'s cachedir capture for this machine (signed with
        `key`, stamped with `serial` when given)."""
        self.n += 1
        caps = capture(self.tmp / f"capture-{self.n}", files)
        m, blobs = build_manifest(workload, node_fingerprint(), "cachedir", caps,
                                  {"unpacked_bytes": sum(map(len, files.values()))})  # fmt: skip
        clock = (lambda: serial) if serial is not None else now_us
        return publish(self.store, m, blobs, key, clock=clock).manifest

    def delete_manifest(self, workload: str = "mlp") -> None:
        (self.store.root / keys.manifest_key(workload, _digest())).unlink()

    def pull(self, *flags: str, workloads: tuple[str, ...] = ("mlp",),
             trusted: tuple[str, ...] = (), deadline_s: float = 60,
             env: dict[str, str] | None = None) -> dict:  # fmt: skip
        """A fresh `pull`; the marker it wrote."""
        cfg = self.tmp / "node.yaml"
        doc = {"store": self.store.url, "cache_dir": str(self.cache_dir), "deadline_s": deadline_s,
               "trusted_keys": list(trusted),
               "workloads": [{**WORKLOAD, "name": w} for w in workloads]}  # fmt: skip
        cfg.write_text(yaml.safe_dump(doc))
        torchwarm("pull", "-c", str(cfg), *flags, env=env)
        return json.loads(self.marker.read_text())

    def leftovers(self) -> list[str]:
        """What the workdir holds besides the lock and what the node remembers."""
        work = install.workdir(self.cache_dir)
        names = [p.name for p in work.iterdir()] if work.exists() else []
        return sorted(n for n in names if n.split("-")[0] in ("staging", "previous", "downloads"))


def _digest() -> str:
    from torchwarm.env import fingerprint

    return fingerprint.digest(node_fingerprint())


def reasons(doc: dict) -> dict[str, str]:
    return {w["workload"]: w["reason"] for w in doc["workloads"]}


@pytest.fixture
def vol(tmp_path: Path) -> Volume:
    return Volume(tmp_path)


# -- row 7: cache_dir is a regular file ---------------------------------------------------


def test_cache_dir_that_is_a_file_is_refused_in_one_line(vol):
    """A cache_dir that is a regular file is refused in one line and left alone, nothing is
    left in the workdir, and once it is removed the next pull installs."""
    vol.publish(GOOD)
    vol.cache_dir.parent.mkdir(parents=True)
    vol.cache_dir.write_bytes(b"an operator's file")
    doc = vol.pull()
    assert doc["status"] == "cold", doc
    assert "is not a folder" in reasons(doc)["mlp"] and "\n" not in reasons(doc)["mlp"]
    assert vol.cache_dir.read_bytes() == b"an operator's file"
    assert vol.leftovers() == []
    vol.cache_dir.unlink()
    assert vol.pull()["status"] == "warm" and tree(vol.cache_dir) == GOOD


def test_plain_file_left_as_staging_is_deleted(tmp_path):
    """A regular file named like a staging folder (what an older swap of a file left) is
    deleted by the next install lock, so it never blocks a later staging folder."""
    cache = make_tree(tmp_path / "inductor", {"x": b"x"})
    install.workdir(cache).mkdir()
    (install.workdir(cache) / "staging-2").write_bytes(b"the file that was cache_dir")
    with install.locked(cache):
        pass
    assert not (install.workdir(cache) / "staging-2").exists()


# -- row 9: an install yields exactly the manifests' trees ---------------------------------


def test_genuine_install_removes_what_an_unsigned_source_planted(vol, seed_key):
    """Files an unsigned manifest installed while keys were off (a file where torch keeps a
    folder, a stray module) are gone after the first genuine signed install."""
    vol.publish(PLANTED)
    assert vol.pull()["status"] == "warm" and tree(vol.cache_dir) == PLANTED
    vol.publish(GOOD, key=seed_key)
    doc = vol.pull(trusted=(seed_key.public_text(),))
    assert doc["status"] == "warm", reasons(doc)
    assert tree(vol.cache_dir) == GOOD


def test_unsigned_tree_of_another_workload_is_dropped_once_keys_are_on(vol, seed_key):
    """A tree another workload installed unsigned is not carried into a signed install."""
    vol.publish({"zz/planted.py": b"import os"}, workload="other")
    vol.publish(GOOD, workload="mlp")
    assert vol.pull(workloads=("mlp", "other"))["status"] == "warm"
    vol.publish(GOOD, workload="mlp", key=seed_key)
    doc = vol.pull(workloads=("mlp", "other"), trusted=(seed_key.public_text(),))
    assert reasons(doc)["other"] and not reasons(doc)["mlp"], reasons(doc)
    assert tree(vol.cache_dir) == GOOD


def test_install_keeps_exactly_the_other_workloads_trees(vol):
    """Reinstalling one workload replaces its tree and keeps the other's; nothing else of
    the previous tree (an earlier copy of it, a file no manifest named) survives."""
    other = {"aotautograd/cd/acde/entry": b"other's entry"}
    vol.publish(GOOD, workload="mlp")
    vol.publish(other, workload="other")
    assert vol.pull(workloads=("mlp", "other"))["status"] == "warm"
    (vol.cache_dir / "stray").write_bytes(b"written by nobody's manifest")
    newer = {"fxgraph/ef/fefg/entry": b"newer graph"}
    vol.publish(newer, workload="mlp")
    assert vol.pull("--workload", "mlp", workloads=("mlp", "other"))["status"] == "warm"
    assert tree(vol.cache_dir) == {**newer, **other}


# -- deep leftovers: deleted without recursion ---------------------------------------------


def deep_tree(root: Path, depth: int, name: str = "dddddddd") -> None:
    """`depth` nested folders named `name` under `root` (9 bytes a level: past PATH_MAX),
    a file at the bottom; built through directory fds, since no path reaches that far."""
    root.mkdir(parents=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(os.open("bottom", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)


@pytest.fixture
def deep_staging(tmp_path):
    """A cache dir whose workdir holds a 1,000-deep `staging-77`, deleted afterwards
    whatever the test did (pytest's own clean-up recurses)."""
    cache = make_tree(tmp_path / "inductor", {"x": b"x"})
    deep_tree(install.workdir(cache) / "staging-77", 1000)
    yield cache
    remove_tree(install.workdir(cache))


def test_thousand_deep_staging_is_deleted(deep_staging):
    """A 1,000-deep `staging-*` left by an older torchwarm is deleted by the next lock."""
    cache = deep_staging
    with install.locked(cache):
        pass
    assert not (install.workdir(cache) / "staging-77").exists()
    assert tree(cache) == {"x": b"x"}


def test_fsync_tree_walks_past_the_recursion_limit(tmp_path):
    """fsync_tree reaches every folder of a 1,500-deep tree (os.walk on Python 3.11
    recurses per level and raised RecursionError)."""
    deep_tree(tmp_path / "t", 1500, name="d")
    seen = []
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fs, "fsync_dir", seen.append)
            fs.fsync_tree(tmp_path / "t")
        assert len(seen) == 1501
    finally:
        remove_tree(tmp_path / "t")


def test_deletion_does_not_follow_a_symlink(tmp_path):
    """A leftover holding a link to a folder outside it loses the link, never the folder."""
    outside = make_tree(tmp_path / "outside", {"keep": b"k"})
    cache = make_tree(tmp_path / "inductor", {"x": b"x"})
    staging = make_tree(install.workdir(cache) / "staging-5", {"a/b": b"b"})
    (staging / "a" / "link").symlink_to(outside)
    with install.locked(cache):
        pass
    assert not staging.exists() and tree(outside) == {"keep": b"k"}


# -- a worker killed at the deadline mid-unpack -------------------------------------------


def test_staging_of_a_worker_killed_at_the_deadline_is_deleted(vol):
    """A worker stuck unpacking at the deadline is killed; its staging folder does not stay
    on the volume until the next pull, while the pull itself ends at the deadline."""
    vol.publish({f"fxgraph/{i:02x}/entry": os.urandom(256) for i in range(8)})
    stuck = {**inject_env("torchwarm.spec.archive:_write_member:c-sleep"),
             "TORCHWARM_TEST_INJECT_SKIP": "3"}  # fmt: skip
    t0 = time.monotonic()
    doc = vol.pull(deadline_s=4, env=stuck)
    assert doc["timed_out"] and time.monotonic() - t0 < 4 + 5
    gone_by = time.monotonic() + 10
    while vol.leftovers() and time.monotonic() < gone_by:
        time.sleep(0.1)
    assert vol.leftovers() == []


# -- row 10: replay memory bounded and recoverable -----------------------------------------


@pytest.mark.parametrize("serial", [YEAR_2100_US, 10**3999], ids=["year-2100", "4000-digits"])
def test_serial_far_ahead_of_the_clock_is_refused_and_not_remembered(vol, serial):
    """A manifest stamped far ahead of the node's clock is refused in one line and never
    remembered: once it is deleted, the next genuine manifest installs."""
    vol.publish(GOOD, serial=serial)
    doc = vol.pull()
    assert doc["status"] == "cold" and "ahead of this node's clock" in reasons(doc)["mlp"], doc
    vol.delete_manifest()
    vol.publish(GOOD)
    assert vol.pull()["status"] == "warm"


def test_remembered_serial_far_ahead_is_ignored(vol):
    """A serial in 2100 that an older torchwarm remembered does not refuse genuine manifests."""
    work = install.workdir(vol.cache_dir)
    work.mkdir(parents=True)
    old = {f"mlp/{_digest()}": {"serial": YEAR_2100_US, "created_at": "2100-01-01T00:00:00Z"}}
    (work / "installed.json").write_text(json.dumps(old))
    vol.publish(GOOD)
    doc = vol.pull()
    assert doc["status"] == "warm", reasons(doc)


def test_unsigned_serial_does_not_refuse_signed_manifests(vol, seed_key):
    """A serial installed unsigned while keys were off does not refuse the signed manifests
    a node takes once keys are on, even when it is higher."""
    vol.publish(PLANTED, serial=now_us() + 3600 * 10**6)
    assert vol.pull()["status"] == "warm"
    vol.delete_manifest()
    vol.publish(GOOD, key=seed_key)
    doc = vol.pull(trusted=(seed_key.public_text(),))
    assert doc["status"] == "warm", reasons(doc)
    assert tree(vol.cache_dir) == GOOD


def test_rollback_across_trusted_keys_is_refused(vol, seed_key):
    """An older manifest signed by one trusted key is refused after a newer one signed by
    another trusted key was installed: per-signer memory reopens no rollback."""
    second = signing.load_secret(signing.generate("seed-2")[0], "test")
    trusted = (seed_key.public_text(), second.public_text())
    old = now_us()
    vol.publish(GOOD, key=second, serial=old + 10**6)
    assert vol.pull(trusted=trusted)["status"] == "warm"
    vol.delete_manifest()
    vol.publish({"fxgraph/ab/fabc/entry": b"older"}, key=seed_key, serial=old)
    doc = vol.pull(trusted=trusted)
    assert doc["status"] == "cold" and "replayed" in reasons(doc)["mlp"], reasons(doc)
    assert tree(vol.cache_dir) == GOOD


def test_deeply_nested_replay_memory_is_damaged_not_fatal(vol):
    """An installed.json nested 100,000 deep reads as damaged memory: the pull installs."""
    work = install.workdir(vol.cache_dir)
    work.mkdir(parents=True)
    (work / "installed.json").write_text("[" * 100_000)
    vol.publish(GOOD)
    doc = vol.pull()
    assert doc["status"] == "warm", reasons(doc)


def test_deeply_nested_tree_record_is_no_record(vol):
    """A tree record nested 100,000 deep reads as no record: the next pull installs."""
    vol.publish(GOOD)
    assert vol.pull()["status"] == "warm"
    st = os.stat(vol.cache_dir)
    record = install.workdir(vol.cache_dir) / f"tree-{st.st_dev}-{st.st_ino}.json"
    assert record.exists()
    record.write_text("[" * 100_000)
    doc = vol.pull()
    assert doc["status"] == "warm", reasons(doc)
    assert tree(vol.cache_dir) == GOOD
