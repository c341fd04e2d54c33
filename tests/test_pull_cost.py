"""What a node's pull costs besides the transfer: its imports and its timed steps.

A made-up cache (synthetic.py) in a local-folder store; every pull is a new process.
No wall time is asserted (bench/pull.py measures it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import WORKLOAD, torchwarm
from factories import tree as installed_files
from synthetic import publish_synthetic, random_files

from torchwarm.spec import signing
from torchwarm.stores import open_store

# Each costs 0.1-1.5 s to import; a local-folder pull without trusted keys needs none.
HEAVY = {"torch", "triton", "boto3", "botocore", "s3transfer", "google", "cryptography"}


@pytest.fixture
def local_node(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A local-folder store holding a made-up cache for this machine; the node's config."""
    store = tmp_path / "store"
    cache = publish_synthetic(open_store(store.as_uri()), tmp_path / "seed",
                              random_files(64 << 10), WORKLOAD["name"], {})  # fmt: skip
    config = tmp_path / "node.yaml"
    doc = {"store": store.as_uri(), "cache_dir": str(tmp_path / "node" / "inductor"),
           "workloads": [WORKLOAD]}  # fmt: skip
    config.write_text(yaml.safe_dump(doc))
    return config, cache.files


def imported_by_pull(config: Path, env: dict[str, str]) -> set[str]:
    """Top-level packages imported by `torchwarm pull` (supervisor and forked worker)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "torchwarm.cli", "pull", "-c", str(config)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", proc.stderr, re.M)
    assert "torchwarm.node.job" in names  # the trace covers the pull
    return {n.split(".")[0] for n in names}


def test_a_local_pull_without_trusted_keys_imports_no_sdk_crypto_or_torch(local_node):
    """A local-folder pull without trusted keys imports neither torch nor a cloud SDK nor
    cryptography, in either process; with a trusted key it does import cryptography
    (so the trace would see one)."""
    config, files = local_node
    env = {"TORCHWARM_TRUSTED_KEYS": ""}
    assert imported_by_pull(config, env) & HEAVY == set()
    assert installed_files(config.parent / "node" / "inductor") == files
    _, public = signing.generate("seed-1")
    assert "cryptography" in imported_by_pull(config, {"TORCHWARM_TRUSTED_KEYS": public})


def test_the_marker_times_each_step_of_the_pull(local_node):
    """The ready marker's timings name the fingerprint and, per workload, the resolve,
    fetch and install, which together fit in the pull's total."""
    config, _ = local_node
    torchwarm("pull", "-c", str(config), "--require", timeout=120)
    doc = json.loads((config.parent / "node" / "torchwarm-ready.json").read_text())
    t, name = doc["timings"], WORKLOAD["name"]
    steps = ["fingerprint_s", f"resolve_s.{name}", f"fetch_s.{name}", f"install_s.{name}"]
    assert set(t) == {*steps, "total_s"}
    assert all(t[k] >= 0 for k in steps) and sum(t[k] for k in steps) <= t["total_s"]
