"""A fleet pulls at once: many `torchwarm pull` processes against SeaweedFS on loopback.

The store holds a made-up cache published for this machine's fingerprint (synthetic.py),
larger than one ranged GET. The nodes reach SeaweedFS through the recording proxy, so
the test sees every request the fleet sent. No wall time is asserted (bench/fleet.py
measures it).
"""

from __future__ import annotations

import subprocess
import uuid
from collections import Counter
from pathlib import Path

import yaml
from conftest import WORKLOAD, spawn
from factories import tree as installed_files
from faultproxy import FaultProxy
from servers import BUCKET, FAKE_AWS_ENV, S3Server, s3_options
from synthetic import publish_synthetic, random_files

from torchwarm.spec import keys
from torchwarm.stores import open_store

NODES = 40
CHUNK = 5 << 20  # download_chunk_size: the blob below takes two ranged GETs
BLOB_BYTES = 7 << 20
S3_OPTIONS = {"path_style": True, "request_checksum_calculation": "when_required",
              "region": "us-east-1", "download_chunk_size": CHUNK}  # fmt: skip


def node_config(path: Path, prefix: str, endpoint: str) -> Path:
    doc = {
        "store": f"s3://{BUCKET}/{prefix}",
        "store_options": {"endpoint_url": endpoint, **S3_OPTIONS},
        "cache_dir": str(path.parent / "unused" / "inductor"),
        "workloads": [WORKLOAD],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_fleet_pulling_at_once_ends_warm_with_bounded_requests(
    seaweedfs_server: S3Server, proxy: FaultProxy, tmp_path: Path, monkeypatch
):
    """40 nodes pull at once: each ends warm with exactly the published files, and the
    store sees per node one manifest GET and one GET per blob range, nothing else."""
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    prefix = f"fleet-{uuid.uuid4().hex[:12]}"
    publisher = open_store(f"s3://{BUCKET}/{prefix}", s3_options(seaweedfs_server.endpoint))
    cache = publish_synthetic(publisher, tmp_path / "seed", random_files(BLOB_BYTES),
                              WORKLOAD["name"], FAKE_AWS_ENV)  # fmt: skip
    ranges = -(-cache.blob_size // CHUNK)
    assert ranges == 2, cache.blob_size  # the blob spans more than one range
    config = node_config(tmp_path / "node.yaml", prefix, proxy.endpoint)
    proxy.reset()  # the publisher went straight to SeaweedFS; count the nodes only

    dirs = [tmp_path / f"node-{i}" / "inductor" for i in range(NODES)]
    pull = ("pull", "-c", str(config), "--require", "--cache-dir")
    procs = [
        spawn(*pull, str(d), env=FAKE_AWS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for d in dirs
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0] * NODES, [e for _, e in outs if e][:3]

    for d in dirs:
        assert installed_files(d) == cache.files, d
    m = cache.manifest
    manifest_path = f"/{BUCKET}/{prefix}/{keys.manifest_key(m.workload, m.fingerprint_digest)}"
    blob_path = f"/{BUCKET}/{prefix}/{keys.blob_key(m.blobs[0].sha256)}"
    seen = Counter(
        (m, "manifest" if p == manifest_path else "blob" if p == blob_path else p, status)
        for m, p, status, _ in proxy.answers
    )
    assert seen == {("GET", "manifest", 206): NODES, ("GET", "blob", 206): NODES * ranges}, seen
