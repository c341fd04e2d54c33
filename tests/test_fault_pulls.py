"""Pulls through a fault-injecting TCP proxy in front of SeaweedFS: exact bytes or nothing.

The seed's capture is pushed once; every pull then runs in this process (torch imports
once) into a fresh cache dir, through `tcpfaults.TcpFaultProxy`, with short timeouts.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import WORKLOAD
from factories import seed_files, tree
from servers import BUCKET, S3Server, fake_aws_env, s3_options
from tcpfaults import Fault, TcpFaultProxy

from torchwarm import config
from torchwarm.node import gate as node
from torchwarm.seed import warmup as wu
from torchwarm.seed.publish import build_manifest, publish
from torchwarm.stores import open_store

pytestmark = pytest.mark.compile

STORE_OPTIONS = {
    "path_style": True,
    "request_checksum_calculation": "when_required",
    "region": "us-east-1",
    "read_timeout_s": 2,
    "connect_timeout_s": 2,
    "attempts": 3,
    "deadline_s": 8,
}
RATES = {"reset": 0.08, "truncate": 0.08, "flip": 0.05, "stall": 0.03, "503": 0.08}


def blob_get(method: str, path: str) -> bool:
    return method == "GET" and "/blobs/sha256/" in path


@pytest.fixture(scope="module")
def pushed(seed, seaweedfs_server: S3Server) -> tuple[str, dict[str, bytes]]:
    """The seed's cachedir capture pushed to a fresh SeaweedFS prefix, and the seed's files."""
    prefix = f"faults-{uuid.uuid4().hex[:12]}"
    result = wu.WarmupResult.load(seed.out("cachedir") / "mlp")
    m, files = build_manifest(
        result.workload, result.fingerprint, result.format, result.captured, result.summary
    )
    with pytest.MonkeyPatch.context() as mp:
        fake_aws_env(mp)
        options = s3_options(
            seaweedfs_server.endpoint, request_checksum_calculation="when_required"
        )
        publish(open_store(f"s3://{BUCKET}/{prefix}", options), m, files)
    expected = seed_files(seed.out("cachedir") / "mlp" / "cache")
    assert any(k.endswith(".so") for k in expected) and any(
        k.startswith("fxgraph/") for k in expected
    )
    return prefix, expected


@pytest.fixture
def puller(pushed, seaweedfs_server: S3Server, tmp_path: Path, monkeypatch):
    """pull(proxy, i) -> (report, cache dir): fail-open node i pulls through the proxy."""
    fake_aws_env(monkeypatch)
    prefix, _ = pushed

    def pull(proxy: TcpFaultProxy, i: int = 0) -> tuple[Any, Path]:
        base = tmp_path / f"node{i}"
        base.mkdir()
        doc = {
            "store": f"s3://{BUCKET}/{prefix}",
            "store_options": {"endpoint_url": proxy.endpoint, **STORE_OPTIONS},
            "cache_dir": str(base / "cache" / "inductor"),
            "deadline_s": 60,
            "workloads": [WORKLOAD],
        }
        (base / "c.yaml").write_text(yaml.safe_dump(doc))
        cfg = config.load(base / "c.yaml")
        return node.pull(cfg, require=False), cfg.cache_dir  # fail-open never raises

    return pull


def check(report: Any, cache_dir: Path, expected: dict[str, bytes]) -> str:
    """Warm with exactly the seed's files, or cold with nothing installed and a one-line
    reason; return the status."""
    (w,) = report.workloads
    if report.status == "warm":
        assert tree(cache_dir) == expected
    else:
        assert report.status == "cold" and not cache_dir.exists()
        assert w.reason and "\n" not in w.reason
    return report.status


def test_50_random_fault_pulls_install_exact_bytes_or_nothing(pushed, seaweedfs_server, puller):
    """50 pulls through random faults each install the exact seed tree or nothing, and say why."""
    _, expected = pushed
    port = int(seaweedfs_server.endpoint.rsplit(":", 1)[1])
    statuses = []
    with TcpFaultProxy(port, seed=20261126, rates=RATES) as proxy:
        for i in range(50):
            outcome, cache_dir = puller(proxy, i)
            statuses.append(check(outcome, cache_dir, expected))
    assert statuses.count("warm") >= 10 and statuses.count("cold") >= 3, statuses
    assert all(proxy.fired[k] > 0 for k in RATES), proxy.fired
    assert sum(proxy.fired.values()) >= 20, proxy.fired


@pytest.mark.parametrize("kind", ["reset", "truncate", "stall"])
def test_broken_blob_get_is_retried_to_exact_bytes(kind, pushed, seaweedfs_server, puller):
    """A blob GET reset, truncated or stalled mid-body is retried; the exact tree is installed."""
    _, expected = pushed
    port = int(seaweedfs_server.endpoint.rsplit(":", 1)[1])
    with TcpFaultProxy(port, match=blob_get) as proxy:
        proxy.plan(Fault(kind, at=0.5))
        start = time.monotonic()
        report, cache_dir = puller(proxy)
        wall = time.monotonic() - start
    assert proxy.fired == {kind: 1}
    assert check(report, cache_dir, expected) == "warm"
    assert len(proxy.requests("GET", "/blobs/")) == 2
    if kind == "stall":
        assert wall >= STORE_OPTIONS["read_timeout_s"]


def test_byte_flipped_once_in_transit_is_downloaded_again(pushed, seaweedfs_server, puller):
    """A blob whose bytes were flipped once in transit fails its digest, is fetched again,
    and the exact tree is installed."""
    port = int(seaweedfs_server.endpoint.rsplit(":", 1)[1])
    with TcpFaultProxy(port, match=blob_get) as proxy:
        proxy.plan(Fault("flip", at=0.5))
        report, cache_dir = puller(proxy)
    assert proxy.fired == {"flip": 1}
    assert len(proxy.requests("GET", "/blobs/")) == 2
    assert check(report, cache_dir, pushed[1]) == "warm"


def test_blob_flipped_on_every_download_is_refused(pushed, seaweedfs_server, puller):
    """A blob that fails its digest twice is refused, one line, and nothing is installed."""
    port = int(seaweedfs_server.endpoint.rsplit(":", 1)[1])
    with TcpFaultProxy(port, match=blob_get) as proxy:
        proxy.plan(Fault("flip", at=0.5), Fault("flip", at=0.25))
        report, cache_dir = puller(proxy)
    assert proxy.fired == {"flip": 2}
    assert check(report, cache_dir, pushed[1]) == "cold"
    reason = report.workloads[0].reason
    assert "sha256" in reason and "twice; refusing" in reason


def test_503_burst_shorter_than_attempts_is_retried(pushed, seaweedfs_server, puller):
    """Two 503 SlowDown answers to the blob GET are retried through to the exact tree."""
    port = int(seaweedfs_server.endpoint.rsplit(":", 1)[1])
    with TcpFaultProxy(port, match=blob_get) as proxy:
        proxy.plan(Fault("503"), Fault("503"))
        report, cache_dir = puller(proxy)
    assert proxy.fired == {"503": 2}
    assert check(report, cache_dir, pushed[1]) == "warm"


def test_503_burst_as_long_as_attempts_starts_cold(pushed, seaweedfs_server, puller):
    """A 503 burst as long as the retry attempts makes the node start cold, saying 503 and why."""
    port = int(seaweedfs_server.endpoint.rsplit(":", 1)[1])
    with TcpFaultProxy(port, match=blob_get) as proxy:
        proxy.plan(*[Fault("503")] * STORE_OPTIONS["attempts"])
        report, cache_dir = puller(proxy)
    assert proxy.fired == {"503": 3}
    assert check(report, cache_dir, pushed[1]) == "cold"
    assert "503" in report.workloads[0].reason and "gave up after 3 attempts" in (
        report.workloads[0].reason
    )
