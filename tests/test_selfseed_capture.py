"""What a node's publish captures from a cache dir the app writes: nothing a node would
refuse, nothing outside the tree. In this process, no compile: the Seeder is given the
pull's report, and the "app" is the test writing files."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import yaml

from torchwarm import config as cfgmod
from torchwarm.env import fingerprint
from torchwarm.node import selfseed
from torchwarm.node.report import PullReport, WorkloadOutcome
from torchwarm.spec import signing


@pytest.fixture
def node(tmp_path: Path) -> tuple[cfgmod.Config, PullReport]:
    """A cold node with a node key and an empty local store."""
    secret, _ = signing.generate("node-1")
    (tmp_path / "node-1.secret").write_text(secret + "\n")
    doc = {"store": str(tmp_path / "store"), "cache_dir": str(tmp_path / "node" / "inductor"),
           "node_key_file": str(tmp_path / "node-1.secret"), "publish": {"mode": "cold"},
           "workloads": [{"name": "app", "command": ["true"]}]}  # fmt: skip
    (tmp_path / "torchwarm.yaml").write_text(yaml.safe_dump(doc))
    cfg = cfgmod.load(tmp_path / "torchwarm.yaml", environ={})
    cfg.cache_dir.mkdir(parents=True)
    cold = WorkloadOutcome("app", "cold", "no cache", no_cache=True)
    digest = fingerprint.digest(fingerprint.collect())
    return cfg, PullReport("cold", str(cfg.cache_dir), digest, cfg.store, [cold], {})


def seeder(cfg: cfgmod.Config, report: PullReport, lines: list[str]) -> selfseed.Seeder:
    s = selfseed.prepare(cfg, report, lines.append)
    assert s is not None, lines
    return s


def test_a_tree_nodes_would_refuse_is_not_published(node):
    """An entry nested deeper than a node's archive reader accepts fails the publish with
    one line, and the store gets no manifest (a manifest every node refuses would hold
    the fingerprint cold until a seed replaced it)."""
    cfg, report = node
    deep = cfg.cache_dir / "fxgraph" / "ab" / "/".join(["d"] * 70)
    deep.mkdir(parents=True)
    (deep / "entry").write_bytes(b"graph")
    lines: list[str] = []
    s = seeder(cfg, report, lines)
    s.publish("the app exited 0")
    assert s.counts == {"published": 0, "skipped": 0, "failed": 1}, lines
    (line,) = lines
    assert line.startswith("publish: failed for app:") and "refusing" in line, line
    assert not list(Path(cfg.store.removeprefix("file://")).rglob("*.json"))


def test_a_link_in_the_cache_dir_does_not_bring_its_target(node, tmp_path):
    """A symlink the app left in the cache dir (to a file only the publisher can read)
    is not in what is published; the regular entries are."""
    cfg, report = node
    secret = tmp_path / "secret"
    secret.write_bytes(b"the node key")
    entry = cfg.cache_dir / "fxgraph" / "ab" / "k" / "entry"
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"graph")
    (cfg.cache_dir / "fxgraph" / "ab" / "k" / "link").symlink_to(secret)
    lines: list[str] = []
    s = seeder(cfg, report, lines)
    s.publish("the app exited 0")
    assert s.counts["published"] == 1, lines
    store = Path(cfg.store.removeprefix("file://"))
    (manifest,) = store.rglob("manifests/**/*.json")
    (blob,) = json.loads(manifest.read_text())["blobs"]
    from torchwarm.spec import archive

    blob_path = store / "blobs" / "sha256" / blob["sha256"][:2] / blob["sha256"]
    assert archive.members(blob_path) == ["fxgraph/ab/k/entry"]


def test_no_thread_for_the_watch_is_one_line_not_an_error(node, monkeypatch):
    """Where no thread can be started (a full pids cgroup), starting the watch says so in
    one line and returns: `run` has spawned the app already and must go on supervising."""
    cfg, report = node
    cfg = dataclasses.replace(
        cfg, publish=dataclasses.replace(cfg.publish, ready_url="http://127.0.0.1:9/")
    )

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    lines: list[str] = []
    s = seeder(cfg, report, lines)
    monkeypatch.setattr(threading.Thread, "start", refuse)
    assert s.start() is s
    (line,) = lines
    assert line.startswith("publish: cannot watch the app for readiness"), line
    assert s.counts["failed"] == 1


def test_node_keys_without_seed_keys_are_refused(tmp_path):
    """trusted_node_keys without trusted_keys is a config error: such a node would still
    take unsigned seed manifests, which anyone holding the write credentials that node
    publishes need could plant."""
    _, public = signing.generate("node-1")
    path = tmp_path / "torchwarm.yaml"
    path.write_text(yaml.safe_dump({"store": "store", "cache_dir": "inductor",
                                    "trusted_node_keys": [public]}))  # fmt: skip
    with pytest.raises(cfgmod.ConfigError, match="trusted_node_keys needs trusted_keys"):
        cfgmod.load(path, environ={})


def test_a_process_holding_a_node_key_is_not_dumpable(node, tmp_path):
    """Once the node key is loaded the agent is non-dumpable, so that a process of the
    same user (the app `run` started) cannot read the key from its /proc files."""
    code = textwrap.dedent(
        f"""
        import ctypes
        from torchwarm import config
        PR_GET_DUMPABLE = 3
        before = ctypes.CDLL(None).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
        cfg = config.load({str(tmp_path / "torchwarm.yaml")!r}, environ={{}})
        assert cfg.node_key is not None
        print(before, ctypes.CDLL(None).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "0"], out


def test_keygen_says_where_a_node_key_goes(tmp_path):
    """keygen's lines name where the key goes for a seed and for a node, both ways."""
    from conftest import torchwarm

    out = torchwarm("keygen", "node-1", "--out", str(tmp_path)).stdout
    assert "node_key_file" in out and "trusted_node_keys" in out, out
    assert "signing_key_file" in out and "trusted_keys" in out, out
