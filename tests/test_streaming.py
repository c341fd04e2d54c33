"""The node's pull streams its blobs (issue #18): a damaged blob never reaches the cache
dir, a pull stopped mid-stream resumes from its partial copy, a partial copy that is not
a prefix of the blob is not trusted, and a pull swaps and syncs once.

Stores hold synthetic caches made for this machine's fingerprint (synthetic.py: nothing
compiles); every claim about a node is checked with `torchwarm pull` in a fresh process.
SeaweedFS is the session's, reached directly or through the session's counting proxy.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import WORKLOAD, torchwarm
from factories import inject_env, make_tree, tree
from faultproxy import FaultProxy
from servers import BUCKET, FAKE_AWS_ENV, S3Server, fake_aws_env, s3_client, s3_options
from synthetic import SyntheticCache, publish_synthetic, random_files

from torchwarm.node import fetch, install
from torchwarm.spec import keys
from torchwarm.spec.manifest import BlobRef
from torchwarm.stores import open_store
from torchwarm.stores.local import LocalStore

CHUNK = 64 << 10  # download_chunk_size: the smallest allowed, so a blob spans many ranges
FILES = random_files(3 << 19)  # ~1.5 MiB of random bytes: a blob of ~24 ranges
PREVIOUS = {"earlier-entry": b"from a previous boot"}


@dataclass
class Node:
    """A node's config over a store holding one synthetic cache; `object` is the blob's
    path in the local store's folder, or its key in the bucket."""

    config: Path
    cache_dir: Path
    cache: SyntheticCache
    object: Path | str

    @property
    def blob(self) -> BlobRef:
        return self.cache.manifest.blobs[0]

    @property
    def partial(self) -> Path:
        return fetch.partials_dir(install.workdir(self.cache_dir)) / f"{self.blob.sha256}.partial"

    def pull(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return torchwarm(
            "pull", "-c", str(self.config), *extra, env={**FAKE_AWS_ENV, **(env or {})}
        )

    def marker(self) -> dict[str, Any]:
        return json.loads((self.cache_dir.parent / "torchwarm-ready.json").read_text())

    def leftovers(self) -> list[str]:
        """Staging folders and partial blobs left in the workdir."""
        work = install.workdir(self.cache_dir)
        return [p.name for p in [*work.glob("staging-*"), *work.glob("blobs/*")]]


def config(root: Path, store: str, options: dict[str, Any] | None = None,
           names: tuple[str, ...] = ("mlp",)) -> tuple[Path, Path]:  # fmt: skip
    """A node config (path, cache dir) for the workloads `names` of `store`."""
    doc: dict[str, Any] = {"store": store, "cache_dir": str(root / "volume" / "inductor"),
                           "workloads": [{**WORKLOAD, "name": n} for n in names]}  # fmt: skip
    if options:
        doc["store_options"] = options
    (root / "volume").mkdir(parents=True, exist_ok=True)
    (root / "node.yaml").write_text(yaml.safe_dump(doc))
    return root / "node.yaml", root / "volume" / "inductor"


def local_node(root: Path) -> Node:
    """A local-folder store holding FILES."""
    store = LocalStore(root / "store")
    cache = publish_synthetic(store, root / "capture", FILES)
    cfg, cache_dir = config(root, store.url)
    return Node(cfg, cache_dir, cache, store.root / keys.blob_key(cache.manifest.blobs[0].sha256))


def s3_node(root: Path, seaweedfs: S3Server, endpoint: str | None = None) -> Node:
    """A fresh SeaweedFS prefix holding FILES; the node reaches it at `endpoint` (default:
    SeaweedFS itself) in ranges of CHUNK bytes."""
    prefix = f"streaming-{uuid.uuid4().hex[:12]}"
    store = open_store(f"s3://{BUCKET}/{prefix}", s3_options(seaweedfs.endpoint))
    cache = publish_synthetic(store, root / "capture", FILES)
    options = {"endpoint_url": endpoint or seaweedfs.endpoint, "path_style": True,
               "region": "us-east-1", "download_chunk_size": CHUNK}  # fmt: skip
    cfg, cache_dir = config(root, f"s3://{BUCKET}/{prefix}", options)
    return Node(cfg, cache_dir, cache, f"{prefix}/{keys.blob_key(cache.manifest.blobs[0].sha256)}")


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials for this process's own S3 clients."""
    fake_aws_env(monkeypatch)


def flip_last_chunk(node: Node, endpoint: str) -> None:
    """Flip one byte of the stored blob, inside its last CHUNK bytes."""
    where = node.blob.size - CHUNK // 3
    if isinstance(node.object, Path):
        data = bytearray(node.object.read_bytes())
        data[where] ^= 0x01
        node.object.chmod(0o644)
        node.object.write_bytes(bytes(data))
        return
    client = s3_client(endpoint)
    data = bytearray(client.get_object(Bucket=BUCKET, Key=node.object)["Body"].read())
    data[where] ^= 0x01
    client.put_object(Bucket=BUCKET, Key=node.object, Body=bytes(data))


@pytest.mark.parametrize("previous", [True, False], ids=["previous-tree", "no-tree"])
@pytest.mark.parametrize("backend", ["local", "seaweedfs"])
def test_bit_flipped_in_last_chunk_leaves_cache_dir_as_it_was(backend, previous, request, aws,
                                                              tmp_path):  # fmt: skip
    """A blob with one byte flipped in its last range starts the node cold for sha256, with
    the cache dir exactly as it was and no staging folder or partial blob left."""
    if backend == "local":
        node, endpoint = local_node(tmp_path), ""
    else:
        seaweedfs = request.getfixturevalue("seaweedfs_server")
        node, endpoint = s3_node(tmp_path, seaweedfs), seaweedfs.endpoint
        assert node.blob.size > 4 * CHUNK, node.blob.size  # several ranges
    flip_last_chunk(node, endpoint)
    if previous:
        make_tree(node.cache_dir, PREVIOUS)
    proc = node.pull()
    doc = node.marker()
    assert doc["status"] == "cold" and "sha256" in doc["workloads"][0]["reason"], doc
    assert "starting cold" in proc.stdout and "sha256" in proc.stdout, proc.stdout
    assert (tree(node.cache_dir) if node.cache_dir.exists() else None) == (
        PREVIOUS if previous else None
    )
    assert node.leftovers() == []


def test_pull_killed_mid_stream_is_resumed_by_the_next(seaweedfs_server, proxy: FaultProxy, aws,
                                                       tmp_path):  # fmt: skip
    """A pull whose worker is SIGKILLed half-way through a blob leaves a partial copy; the
    next pull downloads only the rest, installs the exact files and deletes the copy."""
    node = s3_node(tmp_path, seaweedfs_server, proxy.endpoint)
    pieces = -(-node.blob.size // CHUNK)
    assert pieces > 8, node.blob.size
    kill = inject_env("torchwarm.node.fetch:_Reader._take:kill-self")
    proc = node.pull(env={**kill, "TORCHWARM_TEST_INJECT_SKIP": str(pieces // 2)})
    assert node.marker()["status"] == "cold", proc.stdout
    kept = node.partial.stat().st_size
    assert 0 < kept < node.blob.size, (kept, node.blob.size)
    proxy.reset()
    node.pull("--require")
    fetched = proxy.body_bytes("GET", f"/{BUCKET}/{node.object}")
    assert 0 < fetched < node.blob.size, f"{fetched} of {node.blob.size} blob bytes fetched again"
    assert node.marker()["status"] == "warm" and tree(node.cache_dir) == FILES
    assert node.leftovers() == []


@pytest.mark.parametrize("extra", [-(3 << 18), 100], ids=["shorter-damaged", "longer"])
def test_partial_that_is_not_a_prefix_is_not_trusted(extra, seaweedfs_server, proxy: FaultProxy,
                                                     aws, tmp_path):  # fmt: skip
    """Random bytes at the blob's partial path (shorter than the blob: resumed from, fails
    the digest, streamed again from byte 0; longer: discarded at once) still end warm with
    the exact files, and the partial is gone."""
    node = s3_node(tmp_path, seaweedfs_server, proxy.endpoint)
    node.partial.parent.mkdir(parents=True)
    node.partial.write_bytes(os.urandom(node.blob.size + extra))
    proxy.reset()
    node.pull("--require")
    assert node.marker()["status"] == "warm" and tree(node.cache_dir) == FILES
    assert node.leftovers() == []
    fetched = proxy.body_bytes("GET", f"/{BUCKET}/{node.object}")
    # shorter: the rest after the garbage, then the whole blob; longer: the whole blob once
    assert fetched == (node.blob.size - extra if extra < 0 else node.blob.size)


def test_two_workloads_are_swapped_in_once(tmp_path):
    """A fail-open pull of two workloads installs both with one swap: one install_s timing
    that names both."""
    store = LocalStore(tmp_path / "store")
    first = publish_synthetic(store, tmp_path / "a", random_files(64 << 10, seed=1), "mlp")
    second = publish_synthetic(store, tmp_path / "b", random_files(64 << 10, seed=2), "mlp2")
    cfg, cache_dir = config(tmp_path, store.url, names=("mlp", "mlp2"))
    torchwarm("pull", "-c", str(cfg))
    doc = json.loads((cache_dir.parent / "torchwarm-ready.json").read_text())
    assert doc["status"] == "warm" and tree(cache_dir) == {**first.files, **second.files}
    assert [k for k in doc["timings"] if k.startswith("install_s.")] == ["install_s.mlp+mlp2"]


def test_install_syncs_the_volume_not_each_file(tmp_path, monkeypatch):
    """Installing a tree of 200 files calls os.fsync fewer than 10 times (the record and
    folders), not once per file."""
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    files = {f"fxgraph/{i:03d}": b"%d" % i for i in range(200)}

    def fill(folder: Path) -> None:
        make_tree(folder, files)

    cache_dir = tmp_path / "inductor"
    with install.locked(cache_dir):
        calls.clear()
        install.install(cache_dir, [install.Part("mlp", fill)])
    assert tree(cache_dir) == files
    assert len(calls) < 10, len(calls)
