"""install swaps a complete new tree into the cache dir, or leaves it exactly as it was."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import WORKLOAD, torchwarm
from factories import Member, hand_archive, inject_env, make_tree, read_tree, tree
from synthetic import publish_synthetic

from torchwarm.errors import InstallError
from torchwarm.node import install
from torchwarm.node.replay import Memory
from torchwarm.spec import archive
from torchwarm.stores.local import LocalStore

OLD = {"fxgraph/aa/old": b"old entry", "shared": b"old shared"}


def run_install(cache_dir, fill, name="w", **kwargs):
    """Install one workload's share, filled by `fill`, under the lock."""
    with install.locked(cache_dir):
        install.install(cache_dir, [install.Part(name, fill)], **kwargs)


def writer(files):
    """A fill that writes `files` into the staging folder, replacing (never writing through)."""

    def fill(staging):
        for rel, data in files.items():
            p = staging / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.unlink(missing_ok=True)
            p.write_bytes(data)

    return fill


def leftovers(cache_dir):
    """Whatever staging/previous/download folders remain in the workdir."""
    work = install.workdir(cache_dir)
    names = [p.name for p in work.iterdir()] if work.exists() else []
    return sorted(n for n in names if n.split("-")[0] in ("staging", "previous", "downloads"))


def records(cache_dir):
    """The tree records in the workdir (one per tree: the one in place)."""
    return sorted(p.name for p in install.workdir(cache_dir).glob("*tree-*"))


def test_install_creates_missing_cache_dir(tmp_path):
    """Installing into a cache dir that does not exist creates it with the content."""
    cache = tmp_path / "node" / "inductor"
    run_install(cache, writer({"fxgraph/x": b"new"}))
    assert read_tree(cache) == {"fxgraph/x": (b"new", 0o644)}
    assert leftovers(cache) == []


def test_install_keeps_the_other_workloads_files_and_replaces_its_own(tmp_path):
    """Reinstalling one workload replaces its files and keeps another workload's."""
    cache = tmp_path / "inductor"
    run_install(cache, writer({"fxgraph/aa/a": b"a1", "shared": b"a's"}), name="a")
    run_install(cache, writer({"fxgraph/bb/b": b"b1"}), name="b")
    run_install(cache, writer({"fxgraph/aa/a2": b"a2"}), name="a")
    assert tree(cache) == {"fxgraph/aa/a2": b"a2", "fxgraph/bb/b": b"b1"}
    assert leftovers(cache) == [] and len(records(cache)) == 1


def test_install_over_an_unrecorded_tree_yields_only_the_new_files(tmp_path):
    """Files no install recorded (a tree made by hand, or by an older torchwarm) are not
    carried into the new tree."""
    cache = make_tree(tmp_path / "inductor", OLD)
    run_install(cache, writer({"fxgraph/bb/new": b"new entry"}))
    assert tree(cache) == {"fxgraph/bb/new": b"new entry"}


def test_reinstall_links_nothing_of_its_own_previous_copy(tmp_path, monkeypatch):
    """Reinstalling the only workload costs what an install into an empty dir does: no
    file of its previous copy is linked into the new tree, only to be replaced there."""
    cache = tmp_path / "inductor"
    files = {f"fxgraph/{i:02x}/entry": b"e" for i in range(50)}
    run_install(cache, writer(files))
    links = []
    real = os.link
    monkeypatch.setattr(os, "link", lambda *a, **k: links.append(a) or real(*a, **k))
    run_install(cache, writer(files))
    assert links == [] and tree(cache) == files


def test_kept_file_replaced_since_its_install_is_dropped(tmp_path):
    """A kept workload's file that is no longer the one installed (another inode at its
    path) is not carried over."""
    cache = tmp_path / "inductor"
    run_install(cache, writer({"b1": b"b1", "b2": b"b2"}), name="b")
    (cache / "b2.tmp").write_bytes(b"rewritten by someone")
    os.replace(cache / "b2.tmp", cache / "b2")
    run_install(cache, writer({"a": b"a"}), name="a")
    assert tree(cache) == {"a": b"a", "b1": b"b1"}


def test_kept_file_clashing_with_a_new_one_gives_way(tmp_path):
    """A kept workload's file where the new workload has a folder is left out; the new
    workload's tree is complete."""
    cache = tmp_path / "inductor"
    run_install(cache, writer({"fxgraph": b"a file", "b": b"b"}), name="b")
    run_install(cache, writer({"fxgraph/aa/a": b"a"}), name="a")
    assert tree(cache) == {"fxgraph/aa/a": b"a", "b": b"b"}


def test_clashing_parts_of_one_swap_are_an_install_error(tmp_path):
    """Two workloads of one swap that install a path as a file and as a folder are an
    InstallError naming both, and the cache dir is untouched."""
    cache = make_tree(tmp_path / "inductor", OLD)
    parts = [install.Part("a", writer({"x": b"file"})), install.Part("b", writer({"x/y": b"y"}))]
    with install.locked(cache), pytest.raises(InstallError, match="'a' and 'b' both install 'x'"):
        install.install(cache, parts)
    assert tree(cache) == OLD
    assert leftovers(cache) == []


def test_install_with_archive_does_not_touch_old_inode(tmp_path):
    """A file the archive replaces is a new inode: an old open reader still sees the old bytes."""
    cache = make_tree(tmp_path / "inductor", OLD)
    blob = hand_archive(tmp_path / "a.tzst", [Member("shared", b"from archive")])
    with (cache / "shared").open("rb") as reader:
        run_install(cache, lambda staging: archive.extract(blob, staging))
        assert reader.read() == b"old shared"
    assert (cache / "shared").read_bytes() == b"from archive"


def test_failing_fill_leaves_cache_dir_untouched(tmp_path):
    """A fill that raises leaves the cache dir byte-for-byte as it was, and no staging folder."""
    cache = make_tree(tmp_path / "inductor", OLD)
    before = read_tree(cache)
    blob = hand_archive(tmp_path / "a.tzst", [Member("shared", b"overwritten?")])

    def fill(staging):
        archive.extract(blob, staging)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        run_install(cache, fill)
    assert read_tree(cache) == before
    assert leftovers(cache) == []


def test_failing_fill_on_missing_cache_dir_creates_nothing(tmp_path):
    """A fill that raises when there was no cache dir leaves no cache dir."""
    cache = tmp_path / "inductor"

    def fill(staging):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_install(cache, fill)
    assert not cache.exists()
    assert leftovers(cache) == []


def test_two_rename_fallback_installs(tmp_path, monkeypatch):
    """Where renameat2 is unavailable, the two-rename swap installs and leaves no previous tree."""
    monkeypatch.setattr(install, "_exchange", lambda a, b: False)
    cache = make_tree(tmp_path / "inductor", OLD)
    run_install(cache, writer({"new": b"n"}))
    assert set(read_tree(cache)) == {"new"}
    assert leftovers(cache) == []


def test_recover_restores_previous_tree_after_crash(tmp_path):
    """A `previous-*` tree with no cache dir (crash between the two renames) is put back."""
    cache = tmp_path / "inductor"
    work = install.workdir(cache)
    make_tree(work / "previous-4242", OLD)
    with install.locked(cache):
        pass
    assert read_tree(cache) == read_tree(make_tree(tmp_path / "expected", OLD))
    assert leftovers(cache) == []


def test_recover_keeps_newest_previous_tree(tmp_path):
    """With two `previous-*` trees and no cache dir, the most recent one is restored."""
    cache = tmp_path / "inductor"
    work = install.workdir(cache)
    older = make_tree(work / "previous-1", {"v": b"older"})
    make_tree(work / "previous-2", {"v": b"newer"})
    os.utime(older, (1_000_000, 1_000_000))
    with install.locked(cache):
        pass
    assert (cache / "v").read_bytes() == b"newer"
    assert leftovers(cache) == []


def test_recover_drops_previous_when_cache_dir_exists(tmp_path):
    """A `previous-*` tree beside an existing cache dir (crash after the swap) is deleted."""
    cache = make_tree(tmp_path / "inductor", {"current": b"c"})
    make_tree(install.workdir(cache) / "previous-7", OLD)
    with install.locked(cache):
        pass
    assert read_tree(cache) == {"current": (b"c", 0o644)}
    assert leftovers(cache) == []


def test_recover_deletes_stale_staging(tmp_path):
    """A `staging-*` folder left by a killed installer is removed; the cache dir is kept."""
    cache = make_tree(tmp_path / "inductor", OLD)
    make_tree(install.workdir(cache) / "staging-999", {"half": b"installed"})
    make_tree(install.workdir(cache) / "downloads-999", {"blob.part": b"x"})
    with install.locked(cache):
        pass
    assert set(read_tree(cache)) == set(OLD)
    assert leftovers(cache) == []


def test_mount_point_cache_dir_refused(tmp_path, monkeypatch):
    """A cache dir that is a mount point is refused with InstallError, before anything is made."""
    cache = make_tree(tmp_path / "inductor", OLD)
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(cache) or real(p))
    with pytest.raises(InstallError, match="is a mount point"), install.locked(cache):
        pass
    assert not install.workdir(cache).exists()


def test_unusable_parent_is_install_error(tmp_path):
    """A cache dir whose parent is a regular file is an InstallError, not an OSError."""
    (tmp_path / "file").write_bytes(b"")
    with (
        pytest.raises(InstallError, match="cannot create"),
        install.locked(tmp_path / "file" / "inductor"),
    ):
        pass


# -- the commit point: a fresh `pull` whose worker stops after its swap ------------------

NEW = {f"fxgraph/new-{i}": os.urandom(512) for i in range(4)}
DEADLINE = 5.0


def pull_after_the_swap(tmp_path: Path, fault: str, *flags: str, skip: int = 0):
    """A fresh `pull` of NEW over a cache dir holding OLD, with `fault` injected
    (`skip`: the first calls it would hit run for real). Returns (process, cache dir)."""
    store = LocalStore(tmp_path / "store")
    published = publish_synthetic(store, tmp_path / "capture", NEW)
    cache = make_tree(tmp_path / "volume" / "inductor", OLD)
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"store": store.url, "cache_dir": str(cache),
                                   "deadline_s": DEADLINE, "workloads": [WORKLOAD]}))  # fmt: skip
    env = {**inject_env(fault), "TORCHWARM_TEST_INJECT_SKIP": str(skip)}
    proc = torchwarm("pull", "-c", str(cfg), *flags, env=env, check=False, timeout=60)
    return proc, cache, published.manifest


# The second _rmtree of an install removes the previous tree (the first clears staging).
STUCK_CLEANUP = "torchwarm.node.install:_rmtree:c-sleep"


@pytest.mark.parametrize("flags", [(), ("--require",)], ids=["fail-open", "require"])
def test_deadline_during_the_old_trees_cleanup_is_warm(tmp_path, flags):
    """A pull whose deadline passes while it deletes the previous tree exits 0 with the new
    tree and a warm marker: the swap had committed."""
    proc, cache, _ = pull_after_the_swap(tmp_path, STUCK_CLEANUP, *flags, skip=1)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((cache.parent / "torchwarm-ready.json").read_text())
    assert doc["status"] == "warm" and not doc["timed_out"], doc
    assert tree(cache) == NEW


def test_replay_memory_survives_a_worker_stopped_in_cleanup(tmp_path):
    """The installed manifest's serial is remembered even when the worker never finished."""
    _, cache, m = pull_after_the_swap(tmp_path, STUCK_CLEANUP, skip=1)
    entry = Memory(install.workdir(cache)).entries[Memory.key(m)]
    assert entry["serial"] == m.serial


@pytest.mark.parametrize("flags", [(), ("--require",)], ids=["fail-open", "require"])
def test_worker_killed_right_after_the_rename_is_warm(tmp_path, flags):
    """A worker killed between its rename and its report (at the parent's fsync) leaves a
    complete new tree, and the marker and exit code say so: never cold over a new tree."""
    proc, cache, _ = pull_after_the_swap(tmp_path, "torchwarm.node.install:fsync_dir:kill-self",
                                         *flags)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((cache.parent / "torchwarm-ready.json").read_text())["status"] == "warm"
    assert tree(cache) == NEW
