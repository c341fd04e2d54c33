"""Signed manifests: a node with trusted keys installs only what a trusted seed signed,
never an older manifest than it already installed, and refuses everything else in one
line, fail-open included. No compiling: the blobs are small hand-made cache trees."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import torchwarm

from torchwarm import config as cfgmod
from torchwarm.env import fingerprint
from torchwarm.errors import ConfigError, IntegrityError
from torchwarm.formats import Captured
from torchwarm.node import gate as node
from torchwarm.seed.publish import build_manifest, now_us, publish
from torchwarm.spec import archive, keys, signing
from torchwarm.stores.local import LocalStore

WORKLOAD = {"name": "mlp", "model": "torchwarm.models:mlp", "inputs": [[{"shape": [1, 8]}]]}


@pytest.fixture(scope="session")
def fields(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """This machine's real fingerprint (a node only resolves manifests made for it)."""
    return fingerprint.collect()


@pytest.fixture(scope="session")
def seed_key() -> signing.SigningKey:
    return signing.load_secret(signing.generate("seed-1")[0], "test")


class Setup:
    def __init__(self, tmp: Path, fields: dict) -> None:
        self.tmp, self.fields = tmp, fields
        self.store = LocalStore(tmp / "store")
        self.cache_dir = tmp / "node" / "inductor"

    def publish(self, key: signing.SigningKey | None, content: bytes = b"entry", serial=None):
        """Publish a one-file cache tree as the seed would (with a clock reading `serial`,
        when given); return the manifest stored."""
        tree = self.tmp / f"tree-{content.hex()}"
        (tree / "fxgraph").mkdir(parents=True, exist_ok=True)
        (tree / "fxgraph" / "entry").write_bytes(content)
        blob = self.tmp / f"{content.hex()}.tar.zst"
        archive.write(tree, ["fxgraph/entry"], blob)
        captured = [Captured("cachedir", blob, archive.MEDIA_TYPE)]
        m, files = build_manifest("mlp", self.fields, "cachedir", captured, {})
        clock = (lambda: serial) if serial is not None else now_us
        return publish(self.store, m, files, key, clock=clock).manifest

    def manifest_path(self) -> Path:
        return self.store.root / keys.manifest_key("mlp", fingerprint.digest(self.fields))

    def config(self, trusted: list[str], require: bool = False) -> cfgmod.Config:
        doc = {"store": str(self.store.root), "cache_dir": str(self.cache_dir),
               "trusted_keys": trusted, "require": require, "workloads": [WORKLOAD]}  # fmt: skip
        path = self.tmp / "node.yaml"
        path.write_text(yaml.safe_dump(doc))
        return cfgmod.load(path, environ={})

    def installed(self) -> bytes | None:
        entry = self.cache_dir / "fxgraph" / "entry"
        return entry.read_bytes() if entry.exists() else None


@pytest.fixture
def setup(tmp_path: Path, fields: dict) -> Setup:
    return Setup(tmp_path, fields)


def cold_reason(report: node.PullReport) -> str:
    (o,) = report.workloads
    assert o.status == "cold"
    assert "\n" not in o.reason
    return o.reason


def test_signed_by_a_trusted_key_installs(setup, seed_key):
    """A manifest signed by a trusted key is installed."""
    setup.publish(seed_key)
    report = node.pull(setup.config([seed_key.public_text()]))
    assert report.status == "warm" and setup.installed() == b"entry"


def test_unsigned_manifest_is_refused_fail_open_too(setup, seed_key):
    """With trusted keys set, an unsigned manifest is refused and the node starts cold."""
    setup.publish(None)
    reason = cold_reason(node.pull(setup.config([seed_key.public_text()])))
    assert "unsigned" in reason and setup.installed() is None


def test_unknown_key_is_refused(setup, seed_key):
    """A manifest signed by a key the node does not trust is refused."""
    stranger = signing.load_secret(signing.generate("mallory-1")[0], "test")
    setup.publish(stranger)
    reason = cold_reason(node.pull(setup.config([seed_key.public_text()])))
    assert "'mallory-1', which is not a trusted key" in reason and setup.installed() is None


def test_tampered_manifest_is_refused(setup, seed_key):
    """Any edit to a signed manifest (here: its created_by) breaks the signature."""
    setup.publish(seed_key)
    doc = json.loads(setup.manifest_path().read_bytes())
    doc["created_by"] = "someone else"
    setup.manifest_path().write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="does not match its content"):
        node.pull(setup.config([seed_key.public_text()], require=True))
    assert setup.installed() is None


def test_manifest_pointed_at_another_blob_is_refused(setup, seed_key):
    """Re-pointing a signed manifest at another (existing) blob breaks the signature."""
    setup.publish(seed_key, b"good")
    evil = setup.publish(None, b"evil")  # a blob the attacker uploaded
    setup.publish(seed_key, b"good")  # the seed's manifest is back in place
    doc = json.loads(setup.manifest_path().read_bytes())
    doc["blobs"][0].update(sha256=evil.blobs[0].sha256, size=evil.blobs[0].size)
    setup.manifest_path().write_text(json.dumps(doc))
    reason = cold_reason(node.pull(setup.config([seed_key.public_text()])))
    assert "does not match its content" in reason and setup.installed() is None


def test_swapped_blob_bytes_are_refused(setup, seed_key):
    """Replacing a blob's bytes under its key fails the sha256 check; nothing installed."""
    m = setup.publish(seed_key, b"good")
    blob = setup.store.root / keys.blob_key(m.blobs[0].sha256)
    other = setup.publish(None, b"evil")
    blob.write_bytes((setup.store.root / keys.blob_key(other.blobs[0].sha256)).read_bytes())
    setup.publish(seed_key, b"good")
    reason = cold_reason(node.pull(setup.config([seed_key.public_text()])))
    assert "sha256" in reason and setup.installed() is None


def test_replayed_older_manifest_is_refused(setup, seed_key):
    """After installing serial 2, a validly signed serial 1 (a replay) is refused."""
    old = setup.publish(seed_key, b"old", serial=1)
    old_bytes = setup.manifest_path().read_bytes()
    setup.publish(seed_key, b"new", serial=2)
    cfg = setup.config([seed_key.public_text()])
    assert node.pull(cfg).status == "warm" and setup.installed() == b"new"
    setup.manifest_path().write_bytes(old_bytes)  # the attacker puts the old one back
    reason = cold_reason(node.pull(cfg))
    assert "older (serial 1)" in reason and "replayed" in reason
    assert setup.installed() == b"new"  # the newer install stays
    assert old.serial == 1


def test_rotation_accepts_either_trusted_key(setup, seed_key):
    """With two trusted keys, manifests signed by either one install."""
    new_key = signing.load_secret(signing.generate("seed-2")[0], "test")
    cfg_keys = [seed_key.public_text(), new_key.public_text()]
    setup.publish(new_key, b"by-2", serial=5)
    assert node.pull(setup.config(cfg_keys)).status == "warm"
    setup.publish(seed_key, b"by-1", serial=6)
    assert node.pull(setup.config(cfg_keys)).status == "warm" and setup.installed() == b"by-1"


def test_without_trusted_keys_unsigned_is_accepted(setup):
    """A node with no trusted keys configured installs unsigned manifests (digests still hold)."""
    setup.publish(None)
    assert node.pull(setup.config([])).status == "warm"


def test_cli_refusal_is_one_line_and_exit_4(setup, seed_key):
    """`pull --require` on a tampered manifest exits 4 with one stderr line."""
    setup.publish(seed_key)
    doc = json.loads(setup.manifest_path().read_bytes())
    doc["warmup"] = {"counters": {"forged": 1}}
    setup.manifest_path().write_text(json.dumps(doc))
    setup.config([seed_key.public_text()])
    proc = torchwarm("pull", "-c", str(setup.tmp / "node.yaml"), "--require", check=False)
    assert proc.returncode == 4
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing it" in lines[0]
    assert setup.installed() is None


def test_signing_key_from_environment(tmp_path):
    """$TORCHWARM_SIGNING_KEY loads the seed's key; combined with a key file it is an error."""
    secret, public = signing.generate("seed-9")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"store": "s", "cache_dir": "c"}))
    cfg = cfgmod.load(path, environ={"TORCHWARM_SIGNING_KEY": secret})
    assert cfg.signing_key is not None and cfg.signing_key.public_text() == public
    (tmp_path / "k.secret").write_text(secret)
    path.write_text(
        yaml.safe_dump({"store": "s", "cache_dir": "c", "signing_key_file": "k.secret"})
    )
    with pytest.raises(ConfigError, match="keep one"):
        cfgmod.load(path, environ={"TORCHWARM_SIGNING_KEY": secret})


def test_bad_trusted_key_names_its_place(tmp_path):
    """A malformed trusted key is a ConfigError naming trusted_keys[i] and how to make one."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"store": "s", "cache_dir": "c", "trusted_keys": ["nope"]}))
    with pytest.raises(ConfigError, match=r"trusted_keys\[0\].*torchwarm keygen"):
        cfgmod.load(path, environ={})
    assert os.path.exists(path)
