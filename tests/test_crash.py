"""Processes SIGKILLed mid-push and mid-pull leave the store and the cache dir consistent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from factories import tree

pytestmark = pytest.mark.compile

CRASH = Path(__file__).with_name("crash.py")


def crash(point: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(CRASH), point, "--", *args],
        capture_output=True,
        text=True,
        start_new_session=True,  # death takes the pull's worker too (crash.die)
    )
    assert proc.returncode == -9, f"expected SIGKILL, got {proc.returncode}: {proc.stderr}"
    return proc


def manifests(store: Path) -> list[Path]:
    return sorted((store / "manifests").rglob("*.json")) if (store / "manifests").exists() else []


def visible_objects(store: Path) -> set[str]:
    from torchwarm.stores.local import LocalStore

    return {o.key for o in LocalStore(store).list("")}


@pytest.mark.parametrize("point", ["push-before-manifest", "push-mid-blob"])
def test_killed_push_leaves_no_manifest_naming_a_missing_blob(node_factory, seed, point):
    """A push killed after its blobs, or halfway through one, leaves no manifest at all."""
    node = node_factory(push=False)
    crash(point, "push", "-c", str(node.config), "--from", str(seed.out("cachedir")))
    assert manifests(node.store) == []
    assert not any(k.endswith(".tmp") for k in visible_objects(node.store))
    # The next push completes the job, and a node then resolves a complete manifest.
    from conftest import torchwarm

    torchwarm("push", "-c", str(node.config), "--from", str(seed.out("cachedir")))
    (m,) = manifests(node.store)
    for blob in json.loads(m.read_text())["blobs"]:
        assert f"blobs/sha256/{blob['sha256'][:2]}/{blob['sha256']}" in visible_objects(node.store)


@pytest.mark.parametrize("point", ["pull-mid-extract", "pull-between-renames"])
def test_killed_pull_leaves_the_previous_tree_then_recovers(node_factory, point):
    """A pull killed mid-install leaves the previous cache tree exactly; the next pull completes."""
    node = node_factory()
    node.cache_dir.mkdir(parents=True)
    (node.cache_dir / "earlier-entry").write_bytes(b"from a previous boot")
    before = tree(node.cache_dir)
    crash(point, "pull", "-c", str(node.config))
    # A kill between the two renames leaves no cache dir; the next install puts it back.
    if point == "pull-mid-extract":
        assert tree(node.cache_dir) == before
    assert not node.marker.exists()
    node.pull("--require")
    after = tree(node.cache_dir)
    assert "earlier-entry" not in after  # an install yields exactly the manifest's tree
    assert any(k.startswith("fxgraph/") for k in after)
    workdir = node.cache_dir.parent / f".{node.cache_dir.name}.torchwarm"
    assert not list(workdir.glob("staging-*")) and not list(workdir.glob("previous-*"))


def test_killed_first_pull_leaves_no_cache_dir(node_factory):
    """Killed while installing into an empty node, the pull leaves no partial tree behind."""
    node = node_factory()
    crash("pull-mid-extract", "pull", "-c", str(node.config))
    assert not node.cache_dir.exists()
