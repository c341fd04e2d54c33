"""End to end over S3 (SeaweedFS): seed capture → CLI push → a fresh node process pulls and hits.

The config names the endpoint and addressing options only; credentials reach each CLI
process through its environment, never through the config or this process's environment.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import WORKLOAD, Seed, spawn, torchwarm, write_config
from servers import AWS_ENV_TO_HIDE, BUCKET, FAKE_AWS_ENV, s3_client

pytestmark = pytest.mark.compile

N_SETS = len(WORKLOAD["inputs"])
S3_OPTIONS = {"path_style": True, "request_checksum_calculation": "when_required",
              "region": "us-east-1"}  # fmt: skip


@dataclass
class S3Node:
    """A node config whose store is s3://BUCKET/<prefix> at `endpoint`, and its empty cache dir."""

    config: Path
    endpoint: str
    prefix: str
    cache_dir: Path

    def push(self, seed: Seed, check: bool = True) -> subprocess.CompletedProcess[str]:
        return torchwarm(
            "push", "-c", str(self.config), "--from", str(seed.out("cachedir")),
            env=FAKE_AWS_ENV, check=check,
        )  # fmt: skip

    def pull(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return torchwarm("pull", "-c", str(self.config), *extra, env=FAKE_AWS_ENV, check=check)

    def probe(self) -> dict[str, Any]:
        proc = torchwarm("probe", "-c", str(self.config), "--json", env=FAKE_AWS_ENV)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def keys(self, under: str) -> list[str]:
        """Keys below `under` in this node's store, read with a client of the test's own."""
        client = s3_client(self.endpoint)
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=f"{self.prefix}/{under}"
        )
        return [o["Key"][len(self.prefix) + 1 :] for p in pages for o in p.get("Contents", [])]

    def read(self, key: str) -> bytes:
        obj = s3_client(self.endpoint).get_object(Bucket=BUCKET, Key=f"{self.prefix}/{key}")
        return obj["Body"].read()


@pytest.fixture(autouse=True)
def no_ambient_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing AWS in this process's environment: the CLI gets credentials only via `env`."""
    for name in (*AWS_ENV_TO_HIDE, *FAKE_AWS_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def s3_node(tmp_path: Path) -> Callable[..., S3Node]:
    """Make a node config for a fresh prefix at `endpoint`, with extra store_options."""

    def make(endpoint: str, name: str = "node", **options: Any) -> S3Node:
        base = tmp_path / name
        base.mkdir(parents=True, exist_ok=True)
        prefix = f"node-{uuid.uuid4().hex[:12]}"
        cfg = write_config(
            base / "config.yaml", f"s3://{BUCKET}/{prefix}", base / "cache" / "inductor"
        )
        doc = yaml.safe_load(cfg.read_text())
        doc["store_options"] = {"endpoint_url": endpoint, **S3_OPTIONS, **options}
        cfg.write_text(yaml.safe_dump(doc))
        return S3Node(cfg, endpoint, prefix, base / "cache" / "inductor")

    return make


def _assert_warm(report: dict[str, Any]) -> None:
    c = report["counters"]
    assert c["fxgraph_cache_hit"] == N_SETS and c["fxgraph_cache_miss"] == 0
    assert report["new_so_files"] == 0


def test_fresh_node_pulls_from_seaweedfs_and_hits(seed, seaweedfs_server, s3_node):
    """Push to S3 on SeaweedFS, pull --require into an empty cache dir: a new process hits."""
    node = s3_node(seaweedfs_server.endpoint)
    node.push(seed)
    assert not node.cache_dir.exists()
    assert "warm: mlp" in node.pull("--require").stdout
    _assert_warm(node.probe())


def test_eight_concurrent_publishers_leave_one_manifest(seed, seaweedfs_server, s3_node):
    """Eight pushes of one workload and fingerprint at once: all exit 0, one manifest, one wins."""
    node = s3_node(seaweedfs_server.endpoint)
    args = ("push", "-c", str(node.config), "--from", str(seed.out("cachedir")))
    procs = [
        spawn(*args, env=FAKE_AWS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(8)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, outs
    stdout = "".join(out for out, _ in outs)
    assert stdout.count(": published,") == 1 and stdout.count(": unchanged,") == 7, stdout
    (key,) = node.keys("manifests/")
    blobs = json.loads(node.read(key))["blobs"]
    stored = set(node.keys("blobs/"))
    assert blobs and {f"blobs/sha256/{b['sha256'][:2]}/{b['sha256']}" for b in blobs} <= stored


def test_push_and_pull_survive_30_percent_503(seed, proxy, s3_node):
    """With 30 % of requests answered 503, CLI push and pull --require succeed and the node hits."""
    node = s3_node(proxy.endpoint)
    proxy.fail_rate = 0.3
    node.push(seed)
    assert "warm: mlp" in node.pull("--require").stdout
    assert proxy.failed > 0
    proxy.fail_rate = 0.0
    _assert_warm(node.probe())


def test_all_503_pull_require_exits_3_by_the_deadline(seed, proxy, s3_node):
    """With every request answered 503, pull --require gives up by deadline_s with one line."""
    node = s3_node(proxy.endpoint, deadline_s=3, attempts=50)
    node.push(seed)
    proxy.fail_rate = 1.0
    start = time.monotonic()
    out = node.pull("--require", check=False)
    wall = time.monotonic() - start
    assert out.returncode == 3, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "503" in line and "try again later" in line
    gave_up = re.search(r"gave up after (\d+) attempts? in ([\d.]+) s", line)
    assert gave_up and int(gave_up[1]) < 50 and float(gave_up[2]) <= 3 + 1, line
    # The rest of the wall time is process start and the imports of boto3 (well under 1 s).
    assert wall < 30, wall
    assert not node.cache_dir.exists()


def test_all_503_plain_pull_starts_cold(seed, proxy, s3_node):
    """With every request answered 503, a fail-open pull exits 0 and says it starts cold."""
    node = s3_node(proxy.endpoint, deadline_s=3, attempts=50)
    proxy.fail_rate = 1.0
    out = node.pull(check=False)
    assert out.returncode == 0, out.stderr
    (cold,) = [ln for ln in out.stdout.splitlines() if ln.startswith("starting cold:")]
    assert "503" in cold
    assert not node.cache_dir.exists()
