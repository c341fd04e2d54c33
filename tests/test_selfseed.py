"""The fleet seeds itself (#19), without compiling: `run --publish` and `serve --publish`
beside "apps" of a few lines of Python that write made-up compile entries into
$TORCHINDUCTOR_CACHE_DIR and exit, serve /healthz or sleep, and the store-level rules of
publish_node (first node wins, a seed's manifest is never replaced) and who may sign what.

Every claim about what a node does is checked in fresh `torchwarm` processes; the
real-compile two-node checks live in another file.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import cli_env, spawn, torchwarm, wait_ready
from factories import read_tree
from servers import StoreFactory, free_port
from synthetic import capture

from torchwarm import config as cfgmod
from torchwarm.env import fingerprint
from torchwarm.errors import ConfigError, ManifestError
from torchwarm.seed import publish as pub
from torchwarm.spec import archive, keys, signing
from torchwarm.spec import manifest as mf
from torchwarm.stores import Store
from torchwarm.stores.local import LocalStore

WORKLOAD = {"name": "mlp", "model": "torchwarm.models:mlp", "inputs": [[{"shape": [1, 8]}]]}
# The app. `exit CODE KEY...`: write FX-graph entries KEY... (with a lock and an output
# code file, as torch writes them, and a record of torchwarm's hook), exit CODE. `kill`:
# an entry, then SIGKILL itself. `env FILE`: an entry, its environment into FILE, exit 0.
# `big MIB`: MIB of random entries, exit 0. `http STATUS PORT KEY...`: entries, then
# answer GET /healthz with STATUS (0: nothing listens) until SIGTERM.
APP = r"""
import http.server, json, os, signal, sys, time
cache = os.environ["TORCHINDUCTOR_CACHE_DIR"]

def write(rel, data):
    path = os.path.join(cache, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)

def entry(key, data=None):
    write(f"fxgraph/{key[:2]}/{key}/entry", data if data is not None else key.encode())

mode, args = sys.argv[1], sys.argv[2:]
if mode == "exit":
    for key in args[1:]:
        entry(key)
        write(f"locks/{key}.lock", b"")
        write(f"{key[:2]}/{key}.py", b"# output code of " + key.encode())
    write(".torchwarm-hook-app.json", b"{}")
    sys.exit(int(args[0]))
if mode == "kill":
    entry("abkill")
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "env":
    entry("abenv")
    with open(args[0], "w") as f:
        json.dump(dict(os.environ), f)
    sys.exit(0)
if mode == "big":
    for i in range(int(args[0]) // 8):
        entry(f"ab{i:04d}", os.urandom(8 << 20))
    sys.exit(0)
if mode == "http":
    status, port = int(args[0]), int(args[1])
    for key in args[2:]:
        entry(key)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if status:
        class Health(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(status if self.path == "/healthz" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_):
                pass

        http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
    while True:
        time.sleep(1)
"""
MANIFEST_FIELDS_BEFORE_19 = {
    "format_version", "workload", "fingerprint_digest", "fingerprint", "format", "blobs",
    "warmup", "created_at", "created_by", "serial", "signature",
}  # fmt: skip


@dataclass(frozen=True)
class Key:
    """A key pair as `torchwarm keygen` writes it."""

    secret: str  # what node_key_file or $TORCHWARM_NODE_KEY holds
    public: str  # what trusted_keys or trusted_node_keys hold

    @property
    def signing(self) -> signing.SigningKey:
        return signing.load_secret(self.secret, "test")


@dataclass(frozen=True)
class Keys:
    seed: Key
    node: Key
    node2: Key

    def trusting_nodes(self) -> dict[str, list[str]]:
        """The config of a node that takes node-1's publishes (and seed-1's manifests)."""
        return {"trusted_keys": [self.seed.public], "trusted_node_keys": [self.node.public]}


@pytest.fixture(scope="module")
def k() -> Keys:
    return Keys(*(Key(*signing.generate(name)) for name in ("seed-1", "node-1", "node-2")))


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("app") / "app.py"
    path.write_text(APP)
    return path


@pytest.fixture(scope="module")
def fields() -> dict[str, Any]:
    """This machine's fingerprint: what a node here resolves."""
    return fingerprint.collect()


class Node:
    """A node's config in a folder of its own (cache dir, marker), over a shared store."""

    def __init__(self, root: Path, store: Path, app: Path, node_key: Key, **extra: Any) -> None:
        self.root, self.store, self.app = root, store, app
        self.cache_dir = root / "vol" / "inductor"
        self.workdir = root / "vol" / ".inductor.torchwarm"  # install.workdir
        root.mkdir(parents=True, exist_ok=True)
        doc = {"store": store.as_uri(), "cache_dir": str(self.cache_dir),
               "workloads": [WORKLOAD], **extra}  # fmt: skip
        self.config = root / "node.yaml"
        self.config.write_text(yaml.safe_dump(doc))
        self.env = {"TORCHWARM_BOOT_ID": "boot-1", "TORCHWARM_NODE_KEY": node_key.secret}

    def app_argv(self, *args: str) -> list[str]:
        return [sys.executable, str(self.app), *args]

    def run(self, *args: str, publish: bool = True, **env: str) -> subprocess.CompletedProcess:
        """`torchwarm run [--publish] -- app ARGS`, waited for; `env` adds to the node's."""
        flags = ["--publish"] if publish else []
        return torchwarm("run", "-c", str(self.config), *flags, "--", *self.app_argv(*args),
                         env={**self.env, **env}, check=False)  # fmt: skip

    def start_run(self, *args: str) -> subprocess.Popen[str]:
        return spawn("run", "-c", str(self.config), "--publish", "--", *self.app_argv(*args),
                     env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    def start_app(self, *args: str) -> subprocess.Popen[bytes]:
        """The app on its own, beside a sidecar: it sees only its cache dir."""
        env = cli_env({"TORCHINDUCTOR_CACHE_DIR": str(self.cache_dir)})
        return subprocess.Popen(self.app_argv(*args), env=env)

    def pull(self, *extra: str) -> subprocess.CompletedProcess:
        return torchwarm("pull", "-c", str(self.config), "--json", *extra, env=self.env,
                         check=False)  # fmt: skip

    def pulled(self) -> dict[str, Any]:
        """A fail-open pull's report on the one workload."""
        p = self.pull()
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)["workloads"][0]


@pytest.fixture
def make_node(tmp_path: Path, app: Path, k: Keys) -> Callable[..., Node]:
    """Nodes over the store tmp_path/store, one folder per name, holding the key node-1."""

    def make(name: str = "node", **extra: Any) -> Node:
        return Node(tmp_path / name, tmp_path / "store", app, k.node, **extra)

    return make


def manifests(store: Path) -> list[Path]:
    return sorted((store / "manifests").rglob("*.json"))


def the_manifest(store: Path) -> mf.Manifest:
    (path,) = manifests(store)
    return mf.parse(path.read_bytes(), str(path))


def unpacked(store: Path, m: mf.Manifest, dest: Path) -> dict[str, bytes]:
    """What the manifest's one blob unpacks to: member -> bytes."""
    (blob,) = m.blobs
    archive.extract(store / keys.blob_key(blob.sha256), dest)
    return {rel: data for rel, (data, _mode) in read_tree(dest).items()}


def said(text: str, prefix: str = "torchwarm: publish: ") -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def node_publish(store: Store, tmp: Path, fields: dict, key: Key, files: dict[str, bytes],
                 **kw: Any) -> pub.PublishReport:  # fmt: skip
    """publish_node of a cache dir holding `files`, as a node captures its app's."""
    caps = capture(tmp / uuid.uuid4().hex, files)
    m, blobs = pub.build_manifest("mlp", fields, "cachedir", caps, {"captured_from": "app"})
    return pub.publish_node(store, m, blobs, key.signing, **kw)


def seed_publish(store: Store, tmp: Path, fields: dict, key: Key | None,
                 files: dict[str, bytes], workload: str = "mlp") -> pub.PublishReport:  # fmt: skip
    """A seed's publish of a cache dir holding `files`, signed with `key`."""
    caps = capture(tmp / uuid.uuid4().hex, files)
    m, blobs = pub.build_manifest(workload, fields, "cachedir", caps, {"warmup_key": "w"})
    return pub.publish(store, m, blobs, key.signing if key else None)


# -- run --publish ---------------------------------------------------------------------


def test_run_publish_on_a_cold_node_publishes_the_apps_cache_signed_by_the_node(
    make_node, k, tmp_path
):
    """An app that exits 0 on a cold node leaves one node manifest signed by the node key,
    whose blob holds exactly the files it wrote (no locks, no torchwarm files), and one
    published line."""
    node = make_node()
    p = node.run("exit", "0", "abk1", "cdk2")
    assert p.returncode == 0, p.stderr
    (line,) = said(p.stderr)
    assert line.startswith("torchwarm: publish: published mlp (the app exited 0)"), line
    m = the_manifest(node.store)
    assert (m.publisher, m.signer, m.format) == ("node", "node-1", "cachedir")
    signing.verify(m, signing.load_trusted([k.node.public], "test"), "test")
    assert unpacked(node.store, m, tmp_path / "out") == {
        "fxgraph/ab/abk1/entry": b"abk1", "ab/abk1.py": b"# output code of abk1",
        "fxgraph/cd/cdk2/entry": b"cdk2", "cd/cdk2.py": b"# output code of cdk2",
    }  # fmt: skip


def test_an_app_that_exits_non_zero_keeps_its_code_and_publishes_nothing(make_node):
    """The app exits 3: run exits 3, the store stays empty, and one line says why."""
    node = make_node()
    p = node.run("exit", "3", "abk1")
    assert p.returncode == 3, p.stderr
    assert manifests(node.store) == []
    assert said(p.stderr) == ["torchwarm: publish: nothing published for mlp: the app exited 3"]


def test_an_app_killed_by_a_signal_kills_run_by_it_and_publishes_nothing(make_node):
    """The app dies by SIGKILL: run dies by SIGKILL too, and nothing is published."""
    node = make_node()
    p = node.run("kill")
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert manifests(node.store) == []
    assert said(p.stderr, "torchwarm: publish: nothing published for mlp: ") == [
        "torchwarm: publish: nothing published for mlp: the app was killed by SIGKILL"
    ]


@pytest.mark.parametrize("publish", [True, False], ids=["publish", "no-publish"])
def test_the_app_never_sees_a_key_that_signs_manifests(make_node, k, tmp_path, publish):
    """With $TORCHWARM_NODE_KEY and $TORCHWARM_SIGNING_KEY set for `run`, the app's
    environment holds neither."""
    node = make_node()
    spy = tmp_path / "env.json"
    p = node.run("env", str(spy), publish=publish, TORCHWARM_SIGNING_KEY=k.seed.secret)
    assert p.returncode == 0, p.stderr
    seen = json.loads(spy.read_text())
    assert seen["TORCHINDUCTOR_CACHE_DIR"] == str(node.cache_dir)  # the spy sees run's env
    assert {"TORCHWARM_NODE_KEY", "TORCHWARM_SIGNING_KEY"} & set(seen) == set()
    if publish:  # the key did reach torchwarm: it signed the publish
        assert the_manifest(node.store).signer == "node-1"


def test_two_runs_publishing_at_once_leave_one_manifest_and_their_apps_codes(make_node):
    """Two `run --publish` for one fingerprint started together over one store both exit 0;
    one publishes, the other skips, and the one manifest holds the winner's entry."""
    nodes = [make_node("n1"), make_node("n2")]
    procs = [n.start_run("exit", "0", f"ab{i}") for i, n in enumerate(nodes)]
    ends = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], ends
    lines = [said(err) for _out, err in ends]
    won = [i for i, ls in enumerate(lines) if ls[0].startswith("torchwarm: publish: published")]
    assert len(won) == 1 and all(len(ls) == 1 for ls in lines), lines
    assert lines[1 - won[0]][0].startswith("torchwarm: publish: not for mlp: "), lines
    m = the_manifest(nodes[0].store)
    blob = nodes[0].store / keys.blob_key(m.blobs[0].sha256)
    assert f"fxgraph/ab/ab{won[0]}/entry" in archive.members(blob)


class RacingStore:
    """A store whose put_if_version waits until both publishers have got there."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.both_there = threading.Barrier(2, timeout=60)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def put_if_version(self, key: str, data: bytes, version: str | None) -> bool:
        self.both_there.wait()
        return self._store.put_if_version(key, data, version)


@pytest.mark.parametrize("store_factory", ["local", "moto"], indirect=True)
def test_the_node_that_loses_the_race_to_create_skips(
    store_factory: StoreFactory, k, fields, tmp_path
):
    """Two node publishes that both found no manifest reach the conditional create at once:
    one publishes, the other skips ("another publisher created it first"), and the stored
    manifest is the winner's."""
    store = RacingStore(store_factory())
    reps: dict[str, pub.PublishReport] = {}

    def publish(key: Key) -> None:
        files = {f"fxgraph/ab/{key.public[:6]}/entry": key.public.encode()}
        reps[key.public] = node_publish(store, tmp_path, fields, key, files)

    threads = [threading.Thread(target=publish, args=(key,)) for key in (k.node, k.node2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    by_outcome = {r.outcome: r for r in reps.values()}
    assert sorted(by_outcome) == ["published", "skipped"], reps
    assert by_outcome["skipped"].reason == "another publisher created it first"
    winner = by_outcome["published"]
    stored = store.read(winner.manifest_key, mf.MAX_MANIFEST_BYTES).data
    assert stored == winner.manifest.to_json()


def test_sigterm_during_the_publish_exits_at_once_and_leaves_no_manifest(make_node):
    """SIGTERM while `run` captures a large cache dir after the app exited 0: run exits 0
    at once, no manifest is in the store, and the next pull deletes the capture's folder."""
    node = make_node()
    proc = node.start_run("big", "160")  # its publish takes about 1 s here
    deadline = time.monotonic() + 120
    while not list(node.workdir.glob("staging-publish-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the publish never began"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert manifests(node.store) == [] and said(err) == [], err
    assert node.pull().returncode == 0
    assert list(node.workdir.glob("staging-publish-*")) == []


def test_a_second_publish_in_one_boot_is_refused(make_node):
    """After a publish, a cold start in the same boot publishes nothing (one line says so);
    a start in a new boot publishes again."""
    node = make_node()
    assert node.run("exit", "0", "abk1").returncode == 0
    (path,) = manifests(node.store)
    path.unlink()  # the node is cold again
    p = node.run("exit", "0", "abk1")
    assert p.returncode == 0, p.stderr
    assert said(p.stderr) == [
        "torchwarm: publish: not for mlp: it was published in this boot already"
    ]
    assert manifests(node.store) == []
    p = node.run("exit", "0", "abk1", TORCHWARM_BOOT_ID="boot-2")
    assert said(p.stderr)[0].startswith("torchwarm: publish: published mlp"), p.stderr
    assert len(manifests(node.store)) == 1


def test_mode_misses_adds_the_apps_new_entries_to_a_node_publish(make_node, k, tmp_path):
    """Node 2 (publish: misses, trusting the node key) installs node 1's publish and its app
    writes one more entry: the manifest is replaced, at a higher serial, still by a node,
    holding both entries."""
    first = make_node("n1")
    assert first.run("exit", "0", "abk1").returncode == 0
    before = the_manifest(first.store)
    second = make_node("n2", publish={"mode": "misses"}, **k.trusting_nodes())
    p = second.run("exit", "0", "cdk2")
    assert p.returncode == 0, p.stderr
    assert said(p.stderr)[0].startswith("torchwarm: publish: replaced mlp"), p.stderr
    after = the_manifest(first.store)
    assert after.serial > before.serial and after.publisher == "node"
    got = unpacked(first.store, after, tmp_path / "out")
    assert set(got) == {"fxgraph/ab/abk1/entry", "ab/abk1.py", "fxgraph/cd/cdk2/entry",
                        "cd/cdk2.py"}  # fmt: skip


def test_a_node_manifest_signed_by_a_rotated_out_key_is_replaced(make_node, k, fields,
                                                                  tmp_path):  # fmt: skip
    """After a node key rotation, a node manifest signed by the old key (node-2, no longer
    trusted) leaves the node cold with the reason, and its publish replaces it with one
    signed by the key it trusts, a higher serial: the fingerprint does not stay cold until
    someone deletes the old manifest."""
    store = LocalStore(tmp_path / "store")
    old = node_publish(store, tmp_path, fields, k.node2, {"fxgraph/ab/old/entry": b"old"})
    node = make_node(**k.trusting_nodes())
    p = node.run("exit", "0", "abnew")
    assert p.returncode == 0, p.stderr
    assert "'node-2', which is not a trusted key" in p.stderr, p.stderr
    (line,) = said(p.stderr)
    assert line.startswith("torchwarm: publish: replaced mlp"), line
    m = the_manifest(node.store)
    assert (m.publisher, m.signer) == ("node", "node-1") and m.serial > old.manifest.serial
    assert node.pulled()["status"] == "warm"


def test_mode_misses_never_replaces_a_seeds_manifest(make_node, k, fields, tmp_path):
    """With a seed's manifest installed, mode misses publishes nothing over it (one line
    says a node never replaces it) and the stored bytes are unchanged."""
    node = make_node(publish={"mode": "misses"}, **k.trusting_nodes())
    seed_publish(LocalStore(node.store), tmp_path, fields, k.seed, {"fxgraph/ab/s/entry": b"s"})
    (path,) = manifests(node.store)
    before = path.read_bytes()
    p = node.run("exit", "0", "cdk2")
    assert p.returncode == 0, p.stderr
    assert said(p.stderr) == ["torchwarm: publish: not for mlp: a seed published its cache; "
                              "a node never replaces it"], p.stderr  # fmt: skip
    assert path.read_bytes() == before


# -- serve --publish -------------------------------------------------------------------


@dataclass
class Sidecar:
    port: int
    proc: subprocess.Popen[str]

    def published(self) -> float:
        """torchwarm_publish_total{outcome="published"} on /metrics."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5).read()
        found = re.search(r'^torchwarm_publish_total\{outcome="published"\} (\S+)$',
                          text.decode(), re.M)  # fmt: skip
        assert found, text
        return float(found[1])

    def stop(self) -> tuple[int, str]:
        """SIGTERM; (exit code, its output)."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        return self.proc.returncode, out


@contextlib.contextmanager
def serving(node: Node) -> Iterator[Sidecar]:
    """`torchwarm serve --publish` on the node, ready (its pull done); killed if left."""
    port = free_port()
    proc = spawn("serve", "-c", str(node.config), "--publish", "--listen", f"127.0.0.1:{port}",
                 env=node.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        status, body = wait_ready(port, proc, 60)
        assert status == 200, f"the sidecar never got ready: {status} {body!r}"
        yield Sidecar(port, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@contextlib.contextmanager
def app_beside(node: Node, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = node.start_app(*args)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("health", ["503", "0"], ids=["answers-503", "nothing-listens"])
def test_serve_publish_beside_an_app_never_ready_publishes_nothing(make_node, health):
    """SIGTERM to `serve --publish` whose app wrote entries but never answered its ready_url
    2xx: no manifest, one line "before the app was ready", exit 0."""
    port = free_port()
    node = make_node(publish={"ready_url": f"http://127.0.0.1:{port}/healthz", "quiet_s": 0.5})
    with serving(node) as agent, app_beside(node, "http", health, str(port), "abk1"):
        deadline = time.monotonic() + 30
        while not (node.cache_dir / "fxgraph/ab/abk1/entry").exists():
            assert time.monotonic() < deadline, "the app wrote no entry"
            time.sleep(0.05)
        time.sleep(2.5)  # two readiness checks and scans, quiet_s long past
        code, out = agent.stop()
    assert code == 0, out
    assert said(out, "publish: ") == [
        "publish: nothing published for mlp: SIGTERM came before the app was ready"
    ], out
    assert manifests(node.store) == []


def test_serve_publish_publishes_once_the_app_is_ready_and_quiet(make_node):
    """Beside an app that answers its ready_url 200 and wrote entries, `serve --publish`
    (quiet_s 0.5) publishes while the app runs and counts it on /metrics."""
    port = free_port()
    node = make_node(publish={"ready_url": f"http://127.0.0.1:{port}/healthz", "quiet_s": 0.5})
    with serving(node) as agent, app_beside(node, "http", "200", str(port), "abk1") as app:
        deadline = time.monotonic() + 30
        while not manifests(node.store):
            assert time.monotonic() < deadline, "nothing published"
            time.sleep(0.1)
        assert app.poll() is None  # it published while the app runs
        assert the_manifest(node.store).publisher == "node"
        while agent.published() < 1:  # counted once the manifest is written
            assert time.monotonic() < deadline, "the publish was not counted"
            time.sleep(0.05)
        assert agent.published() == 1
        code, out = agent.stop()
    assert code == 0, out
    (line,) = said(out, "publish: ")
    assert line.startswith("publish: published mlp (the app was ready and wrote no compile "
                           "entry for 0.5 s)"), out  # fmt: skip


# -- trust -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node_published(tmp_path_factory, k, fields) -> Path:
    """A store holding node-1's publish for this machine's fingerprint."""
    root = tmp_path_factory.mktemp("node-published")
    node_publish(LocalStore(root / "store"), root, fields, k.node, {"fxgraph/ab/n/entry": b"n"})
    return root / "store"


@pytest.mark.parametrize("seed_keys", [True, False], ids=["seed-keys", "no-keys"])
def test_a_node_without_trusted_node_keys_refuses_a_node_publish(
    node_published, app, k, tmp_path, seed_keys
):
    """A node with no trusted_node_keys (seed keys set, or no keys at all) starts cold
    from a node's publish, saying trusted_node_keys is not set."""
    extra = {"trusted_keys": [k.seed.public]} if seed_keys else {}
    node = Node(tmp_path / "node", node_published, app, k.node, **extra)
    got = node.pulled()
    assert got["status"] == "cold", got
    assert "published by a node" in got["reason"]
    assert "(trusted_node_keys is not set)" in got["reason"], got["reason"]


def test_pull_require_exits_4_on_a_node_publish_it_does_not_trust(node_published, app, k,
                                                                   tmp_path):  # fmt: skip
    """`pull --require` without trusted_node_keys exits 4 on a node's publish."""
    node = Node(tmp_path / "node", node_published, app, k.node)
    p = node.pull("--require")
    assert p.returncode == 4, p.stderr
    assert "trusted_node_keys is not set" in p.stderr


def test_a_node_trusting_the_node_key_takes_a_node_publish(node_published, app, k, tmp_path):
    """A node whose trusted_node_keys hold node-1 installs node-1's publish."""
    node = Node(tmp_path / "node", node_published, app, k.node, **k.trusting_nodes())
    got = node.pulled()
    assert (got["status"], got["publisher"]) == ("warm", "node"), got
    assert (node.cache_dir / "fxgraph/ab/n/entry").read_bytes() == b"n"


def test_a_node_key_cannot_pass_as_a_seed(app, k, fields, tmp_path):
    """A manifest that says publisher seed but is signed with the node key is checked
    against trusted_keys, and refused, by a node that trusts that node key."""
    store = tmp_path / "store"
    seed_publish(LocalStore(store), tmp_path, fields, k.node, {"fxgraph/ab/x/entry": b"x"})
    node = Node(tmp_path / "node", store, app, k.node, **k.trusting_nodes())
    got = node.pulled()
    assert got["status"] == "cold", got
    assert "signed by 'node-1', which is not a trusted key (trusted_keys: seed-1)" in got["reason"]


# -- who writes what -------------------------------------------------------------------


def test_a_node_publish_never_creates_over_a_seeds_manifest(k, fields, tmp_path):
    """publish_node (create-only) finding a seed's manifest skips; the bytes stay."""
    store = LocalStore(tmp_path / "store")
    seed = seed_publish(store, tmp_path, fields, k.seed, {"fxgraph/ab/s/entry": b"s"})
    before = store.read(seed.manifest_key, mf.MAX_MANIFEST_BYTES).data
    rep = node_publish(store, tmp_path, fields, k.node, {"fxgraph/ab/n/entry": b"n"})
    assert (rep.outcome, rep.reason) == (
        "skipped", "a manifest for this fingerprint is in the store already"
    )  # fmt: skip
    assert store.read(seed.manifest_key, mf.MAX_MANIFEST_BYTES).data == before


def test_a_node_publish_never_replaces_a_seeds_manifest(k, fields, tmp_path):
    """publish_node with `replaces` (mode misses), after a seed's publish replaced the node
    manifest it installed, skips; the seed's bytes stay."""
    store = LocalStore(tmp_path / "store")
    installed = node_publish(store, tmp_path, fields, k.node, {"fxgraph/ab/n/entry": b"n"})
    seed = seed_publish(store, tmp_path, fields, k.seed, {"fxgraph/ab/s/entry": b"s"})
    before = store.read(seed.manifest_key, mf.MAX_MANIFEST_BYTES).data
    rep = node_publish(store, tmp_path, fields, k.node, {"fxgraph/ab/n/entry": b"n", "x": b"x"},
                       replaces=installed.manifest.serial)  # fmt: skip
    assert rep.outcome == "skipped" and "a node never replaces it" in rep.reason, rep
    assert store.read(seed.manifest_key, mf.MAX_MANIFEST_BYTES).data == before


def test_a_seed_publish_replaces_a_node_manifest(k, fields, tmp_path):
    """A seed's publish over a node's manifest replaces it: outcome replaced, publisher seed."""
    store = LocalStore(tmp_path / "store")
    node_publish(store, tmp_path, fields, k.node, {"fxgraph/ab/n/entry": b"n"})
    rep = seed_publish(store, tmp_path, fields, k.seed, {"fxgraph/ab/s/entry": b"s"})
    assert rep.outcome == "replaced"
    stored = mf.parse(store.read(rep.manifest_key, mf.MAX_MANIFEST_BYTES).data, "test")
    assert (stored.publisher, stored.signer) == ("seed", "seed-1")


# -- config ----------------------------------------------------------------------------


def _config(tmp_path: Path, **extra: Any) -> Path:
    doc = {"store": (tmp_path / "store").as_uri(), "cache_dir": str(tmp_path / "c"),
           "workloads": [WORKLOAD], **extra}  # fmt: skip
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("publish", "field"),
    [
        ({"ready_url": "http://10.0.0.7:8000/healthz"}, "publish.ready_url"),
        ({"ready_url": "https://127.0.0.1:8000/healthz"}, "publish.ready_url"),
        ({"mode": "cold", "ready": "http://127.0.0.1:8000/"}, "publish.ready"),
    ],
    ids=["not-loopback", "not-http", "unknown-key"],
)
def test_a_bad_publish_block_is_refused_naming_the_field(tmp_path, publish, field):
    """A ready_url that is not loopback http, or an unknown key under publish, is a config
    error in one line that names the field."""
    with pytest.raises(ConfigError) as e:
        cfgmod.load(_config(tmp_path, publish=publish), environ={})
    assert f"{field} is" in str(e.value) and "\n" not in str(e.value), e.value


def test_a_key_in_both_trusted_lists_is_refused(tmp_path, k):
    """A key in trusted_keys and trusted_node_keys both is a config error."""
    path = _config(tmp_path, trusted_keys=[k.seed.public], trusted_node_keys=[k.seed.public])
    with pytest.raises(ConfigError, match="trusted_node_keys holds 'seed-1', which trusted_keys"):
        cfgmod.load(path, environ={})


def test_a_node_key_that_is_the_signing_key_is_refused(tmp_path, k):
    """node_key equal to the seed's signing key is a config error."""
    env = {"TORCHWARM_NODE_KEY": k.seed.secret, "TORCHWARM_SIGNING_KEY": k.seed.secret}
    with pytest.raises(ConfigError, match="node_key is a seed key"):
        cfgmod.load(_config(tmp_path), environ=env)


def test_run_publish_without_a_node_key_still_runs_the_app(make_node):
    """`run --publish` with no node key runs the app and keeps its exit code, with one
    line: publish is off for want of a node key."""
    node = make_node()
    del node.env["TORCHWARM_NODE_KEY"]
    p = node.run("exit", "5", "abk1")
    assert p.returncode == 5, p.stderr
    (line,) = said(p.stderr)
    assert line.startswith("torchwarm: publish: off: no node key;"), line
    assert manifests(node.store) == []


def test_serve_publish_without_a_ready_url_says_to_set_it(make_node):
    """`serve --publish` with no publish.ready_url says, in one line, to set it."""
    node = make_node()
    with serving(node) as agent:
        code, out = agent.stop()
    assert code == 0, out
    (line,) = said(out, "publish: ")
    assert "set publish.ready_url" in line, line


# -- the manifest ----------------------------------------------------------------------


def test_a_seed_manifest_has_no_publisher_field(k, fields, tmp_path):
    """A seed's manifest holds exactly the fields it held before node publishes existed."""
    store = LocalStore(tmp_path / "store")
    rep = seed_publish(store, tmp_path, fields, k.seed, {"fxgraph/ab/s/entry": b"s"})
    doc = json.loads(store.read(rep.manifest_key, mf.MAX_MANIFEST_BYTES).data)
    assert set(doc) == MANIFEST_FIELDS_BEFORE_19


def test_a_manifest_with_another_publisher_is_refused(k, fields, tmp_path):
    """A manifest whose publisher is neither seed nor node does not parse (one line)."""
    store = LocalStore(tmp_path / "store")
    rep = seed_publish(store, tmp_path, fields, None, {"fxgraph/ab/s/entry": b"s"})
    doc = {**rep.manifest.body(), "publisher": "admin"}
    with pytest.raises(ManifestError) as e:
        mf.parse(json.dumps(doc).encode(), "store/m.json")
    assert "field 'publisher' is 'admin', not one of seed, node" in str(e.value)
    assert "\n" not in str(e.value)


def test_ls_json_shows_the_publisher(make_node, k, fields, tmp_path):
    """`ls --json` says who published each manifest: a node, or a seed."""
    node = make_node()
    store = LocalStore(node.store)
    node_publish(store, tmp_path, fields, k.node, {"fxgraph/ab/n/entry": b"n"})
    seed_publish(store, tmp_path, fields, k.seed, {"fxgraph/ab/s/entry": b"s"}, "tiny")
    p = torchwarm("ls", "-c", str(node.config), "--json")
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert sorted((r["workload"], r["publisher"]) for r in rows) == [
        ("mlp", "node"),
        ("tiny", "seed"),
    ]
