"""Never worse than cold: `pull`, `run`, `serve` and `torchwarm.pull()` in fail-open mode
against everything that can go wrong around a node, each in a fresh process.

Whatever happens short of SIGKILL of the agent, fail-open ends with exit 0 (or the exec
of the app), the previous cache tree or none (never a partial one), and a ready marker
that says `cold` and why in one line. With `--require`: non-zero, one line, nothing
installed, no marker. Stores hold a synthetic cache made for this machine's fingerprint
(no compiling): a pull that works installs exactly its files.

Which cells run, and why they suffice. The decision itself (each workload warm or cold,
its reason, and under `require` the error and exit code, for every state the supervisor
can record: a workload's own failure, a fatal error, the deadline before, during or
after the swap, a worker that died, a line it could not read) is a table of pure calls
in tests/test_settle.py. The cells here prove the ends around it for real:
- `pull`: all 17 scenarios, so that each failure happens for real once, end to end (the
  worker SIGKILLed, a real tmpfs full, a port that never answers, a range that stalls).
- `pull` and `pull --require` again with the store a prefix of the session's SeaweedFS,
  for each scenario whose fault is in the data path (S3_SCENARIOS: download, verify,
  unpack, install), since from S3 a blob streams in ranges while a partial copy of it is
  kept in the workdir for resume (issue #18). The others fail before a blob is read (the
  resolve, the config) or are S3's already (refused, stuck, range stalled).
- `pull --require`, `run`, `serve` and the Python API: one scenario of each class in
  CLASSES (healthy, no cache, store unreachable, deadline, bad data, worker killed, a bug,
  an I/O error, a full disk, a config error), a class's scenarios taken in turn, so that
  every scenario also runs through one entry point besides `pull`. Within a class the
  scenarios differ only in where the worker fails, which no entry point sees: all four
  go through the same gate (`begin`, the supervisor, `_settle`) and differ only in what
  they do with its report (print it, exec the app, answer /readyz, return it), which one
  cell per class proves for each. A deadline cell costs ~4 s: 7 of them, not 12.
- `pull`, `run` and `serve`: each row of issue #20 that is a node's input (ROWS), since
  each broke all three entry points once (row 6 only `serve`), and not alike (exit 1 and
  no app, /readyz never 200, an internal error as the reason, a warm install): row 2, a
  config of 500 nested lists; row 3, a config of aliases that expand to millions of
  tensors, read within 2 GiB of address space; row 4, an archive of folders 1,000 deep
  (no staging folder may stay); row 6, a pids cgroup of one task, where neither the worker
  process nor a thread can start; row 7, a cache_dir that is a regular file (left as it
  is); row 8, `deadline_s: 1e10`, and with `--require` exit 2 naming the bound, for all
  three. Row 6's other half, a peer holding many idle connections, is serve's alone (pull
  and run listen nowhere): every `serve` cell asks /readyz again while 400 are held. The
  API is left out: it is `run`'s gate in the app's own process, where a pids or an
  address-space limit would bind the app itself.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
import zstandard
from conftest import WORKLOAD, readyz, spawn, wait_ready
from factories import (
    Member,
    PidsCgroups,
    alias_bomb_inputs,
    hand_archive,
    inject_env,
    joining,
    limit_address_space,
    make_tree,
    tree,
)
from servers import BUCKET, FAKE_AWS_ENV, fake_aws_env, free_port, s3_client, s3_options
from synthetic import publish_synthetic
from tcpfaults import Fault, TcpFaultProxy

from torchwarm.env import fingerprint
from torchwarm.formats import Captured
from torchwarm.node import fetch
from torchwarm.node.install import workdir
from torchwarm.seed.publish import build_manifest, publish
from torchwarm.spec import archive, keys
from torchwarm.spec import manifest as mf
from torchwarm.stores import open_store
from torchwarm.stores.local import LocalStore

pytestmark = pytest.mark.timed  # deadline bounds; see pyproject.toml

CACHE = {f"fxgraph/entry-{i}": os.urandom(2048) for i in range(8)} | {"kernels/k.so": b"so" * 99}
PREVIOUS = {"earlier-entry": b"from a previous boot"}
DEADLINE = 4.0


@dataclass
class Node:
    """A config for one node: a local store (or another one), a cache volume, a marker;
    `text`, when set, is the YAML written instead of `doc`; the node's processes start
    under `preexec`'s limit, if any."""

    root: Path
    doc: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    text: str | None = None
    preexec: Callable[[], None] | None = None
    before: dict[str, bytes] | bytes = field(default_factory=dict)  # what cache_dir held
    judged: bool = False  # the pull finds its blob good or damaged: no partial copy may stay

    @property
    def config(self) -> Path:
        path = self.root / "node.yaml"
        path.write_text(self.text or yaml.safe_dump(self.doc))
        return path

    @property
    def cache_dir(self) -> Path:
        return Path(self.doc["cache_dir"])

    @property
    def marker(self) -> Path:
        return self.cache_dir.parent / "torchwarm-ready.json"

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        return spawn(*args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     preexec_fn=self.preexec)  # fmt: skip

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        with self.spawn(*args) as proc:
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def seeded(
    tmp_path: Path,
    request: pytest.FixtureRequest | None = None,
    unpacked: bool = True,
    captured: list[Captured] | None = None,
) -> Node:
    """A store holding a synthetic cache for this machine's fingerprint: a local folder, or
    a fresh prefix of the session's SeaweedFS where the test's `backend` is "s3"."""
    if request is None or request.getfixturevalue("backend") == "local":
        store = LocalStore(tmp_path / "store")
        publish_synthetic(store, tmp_path / "capture", CACHE, unpacked=unpacked, captured=captured)
        volume = tmp_path / "volume"
        volume.mkdir(exist_ok=True)
        doc = {"store": store.url, "cache_dir": str(volume / "inductor"), "workloads": [WORKLOAD]}
        return Node(tmp_path, doc)
    server = request.getfixturevalue("seaweedfs_server")
    url = f"s3://{BUCKET}/failopen-{uuid.uuid4().hex[:12]}"
    with pytest.MonkeyPatch.context() as mp:
        fake_aws_env(mp)
        publish_synthetic(open_store(url, s3_options(server.endpoint)), tmp_path / "capture",
                          CACHE, unpacked=unpacked, captured=captured)  # fmt: skip
    node = s3_node(tmp_path, int(server.endpoint.rsplit(":", 1)[1]))
    node.doc["store"] = url
    del node.doc["deadline_s"]  # as a local-folder node's: the scenario sets one if it needs
    return node


def s3_node(tmp_path: Path, port: int) -> Node:
    """A node whose store is an S3 endpoint on 127.0.0.1:port (down or stuck, unless a
    caller points it at a bucket's prefix)."""
    (tmp_path / "volume").mkdir(exist_ok=True)
    doc = {
        "store": "s3://torchwarm-test-bucket/down",
        "store_options": {
            "endpoint_url": f"http://127.0.0.1:{port}",
            "path_style": True,
            "region": "us-east-1",
            "attempts": 2,
            "connect_timeout_s": 1,
            "read_timeout_s": 60,
        },  # fmt: skip
        "cache_dir": str(tmp_path / "volume" / "inductor"),
        "deadline_s": DEADLINE,
        "workloads": [WORKLOAD],
    }
    return Node(tmp_path, doc, dict(FAKE_AWS_ENV))


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[Path, int], None]]:
    """mount(path, kib): a real, small tmpfs at `path`, unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs (a real full filesystem) needs root")
    mounted: list[Path] = []

    def mount(path: Path, kib: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)],
                       check=True)  # fmt: skip
        mounted.append(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def hostile_archive(path: Path) -> Captured:
    """A tar+zstd whose one member's name holds a NUL byte (kept in a PAX header)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("fxgraph/" + "a" * 120 + "\x00.so")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    return Captured("cachedir", path, archive.MEDIA_TYPE)


def manifest_key() -> str:
    """The key of the manifest that a node of this machine resolves for WORKLOAD."""
    return keys.manifest_key("mlp", fingerprint.digest(fingerprint.collect()))


def object_path(node: Node, key: str) -> Path:
    """The file that holds `key` in a node's local-folder store."""
    return Path(node.doc["store"][len("file://") :]) / key


def read_object(node: Node, key: str) -> bytes:
    """What the node's store (a local folder or S3) holds at `key`."""
    if node.doc["store"].startswith("file://"):
        return object_path(node, key).read_bytes()
    bucket, _, prefix = node.doc["store"][len("s3://") :].partition("/")
    client = s3_client(node.doc["store_options"]["endpoint_url"])
    return client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()


def write_object(node: Node, key: str, data: bytes) -> None:
    """Replace what the node's store holds at `key` with `data` (an S3 object is put again
    at its key)."""
    if node.doc["store"].startswith("file://"):
        object_path(node, key).write_bytes(data)
        return
    bucket, _, prefix = node.doc["store"][len("s3://") :].partition("/")
    client = s3_client(node.doc["store_options"]["endpoint_url"])
    client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)


# -- the scenarios: each makes a node and says what its cold reason must name -----------


def healthy(tmp_path, request):
    return seeded(tmp_path, request), None


def no_manifest(tmp_path, request):
    node = seeded(tmp_path)
    object_path(node, manifest_key()).unlink()
    return node, "no cache for workload"


def store_refused(tmp_path, request):
    return s3_node(tmp_path, free_port()), "cannot reach the S3 endpoint"


def store_stuck(tmp_path, request):
    return s3_node(tmp_path, request.getfixturevalue("black_hole")), "deadline"


def any_exception(tmp_path, request):
    node = seeded(tmp_path)
    node.env["TORCHWARM_TEST_INJECT"] = "torchwarm.node.resolve:resolve:raise"
    return node, "internal error: RuntimeError: injected fault"


def oserror_at_read(tmp_path, request):
    """The store's download of the blob (what fetch's stream calls, under the retries)
    fails with EIO."""
    node = seeded(tmp_path, request)
    store = "s3:S3Store" if node.doc["store"].startswith("s3://") else "local:LocalStore"
    node.env["TORCHWARM_TEST_INJECT"] = f"torchwarm.stores.{store}.download:oserror"
    return node, "Input/output error"


def worker_killed(tmp_path, request):
    node = seeded(tmp_path, request)
    node.env["TORCHWARM_TEST_INJECT"] = "torchwarm.node.fetch:sources:kill-self"
    return node, "killed by signal 9"


def stuck_in_c(tmp_path, request):
    node = seeded(tmp_path, request)
    node.doc["deadline_s"] = DEADLINE
    node.env["TORCHWARM_TEST_INJECT"] = "torchwarm.node.fetch:sources:c-sleep"
    return node, "deadline"


# The blob is ~17 KiB (random, so it does not compress), unpacked ~17 KiB more.
def disk_full_space_check(tmp_path, request):
    node = seeded(tmp_path, request)
    request.getfixturevalue("tmpfs")(tmp_path / "volume", 12)
    return node, "not enough free space"


def disk_full_at_download(tmp_path, request):
    """The filesystem really fills up while the blob streams into the staging tree (the
    space check is told there is plenty)."""
    node = seeded(tmp_path, request)
    request.getfixturevalue("tmpfs")(tmp_path / "volume", 12)
    node.env["TORCHWARM_TEST_INJECT"] = "os:statvfs:roomy"
    return node, "no space left"


def disk_full_at_install(tmp_path, request):
    """Room for the download, not for the unpacked tree (a manifest that does not say its
    unpacked size, as older seeds wrote them)."""
    node = seeded(tmp_path, request, unpacked=False)
    # From S3 the space check counts the blob's partial copy too: room for both, in tmpfs
    # pages (4 KiB a file), not for the copy and the tree together.
    kib = 40 if node.doc["store"].startswith("s3://") else 24
    request.getfixturevalue("tmpfs")(tmp_path / "volume", kib)
    return node, "no space left"


def nul_member(tmp_path, request):
    node = seeded(tmp_path, request, captured=[hostile_archive(tmp_path / "evil.tar.zst")])
    node.judged = True  # the blob is read to its end and verified; its archive is refused
    return node, "NUL"


def wrongly_typed_option(tmp_path, request):
    node = seeded(tmp_path)
    node.doc["store_options"] = {"connect_timeout_s": "soon"}
    return node, "store_options.connect_timeout_s is 'soon'; expected a number"


def huge_manifest(tmp_path, request):
    node = seeded(tmp_path)
    with object_path(node, manifest_key()).open("ab") as f:
        f.write(b" " * (mf.MAX_MANIFEST_BYTES + 10))
    return node, "bytes allowed"


def huge_blob(tmp_path, request):
    node = seeded(tmp_path, request)
    blob = keys.blob_key(json.loads(read_object(node, manifest_key()))["blobs"][0]["sha256"])
    write_object(node, blob, read_object(node, blob) + os.urandom(1 << 20))
    node.judged = True
    return node, "bytes allowed"


def absurd_size(tmp_path, request):
    """An (unsigned) manifest that claims a 1 TB blob: refused before any byte moves."""
    node = seeded(tmp_path, request)
    doc = json.loads(read_object(node, manifest_key()))
    doc["blobs"][0]["size"] = 1 << 40
    write_object(node, manifest_key(), json.dumps(doc).encode())
    return node, "not enough free space"


def range_stalled(tmp_path, request):
    """An S3 blob fetched in parallel ranges, one of which stalls mid-body for longer than
    the deadline: blocked reader threads must neither outlive the deadline nor hold the
    agent's exit."""
    server = request.getfixturevalue("seaweedfs_server")
    url = f"s3://{BUCKET}/stall-{uuid.uuid4().hex[:12]}"
    with pytest.MonkeyPatch.context() as mp:
        fake_aws_env(mp)
        store = open_store(url, s3_options(server.endpoint))
        publish_synthetic(store, tmp_path / "capture", {"fxgraph/big": os.urandom(12 << 20)})
    proxy = TcpFaultProxy(
        int(server.endpoint.rsplit(":", 1)[1]),
        match=lambda method, path: method == "GET" and "/blobs/" in path,
        stall_s=120,
    )
    proxy.plan(Fault("pass"), Fault("stall", at=0.5))  # the second range stalls
    request.addfinalizer(proxy.close)
    node = s3_node(tmp_path, 0)
    node.doc["store"] = url
    node.doc["store_options"].update(endpoint_url=proxy.endpoint, download_chunk_size=5 << 20,
                                     concurrency=2, attempts=1)  # fmt: skip
    return node, "deadline"


SCENARIOS: dict[str, Callable[..., tuple[Node, str | None]]] = {
    f.__name__.replace("_", "-"): f
    for f in (
        healthy,
        no_manifest,
        store_refused,
        store_stuck,
        any_exception,
        oserror_at_read,
        worker_killed,
        stuck_in_c,
        disk_full_space_check,
        disk_full_at_download,
        disk_full_at_install,
        nul_member,
        wrongly_typed_option,
        huge_manifest,
        huge_blob,
        absurd_size,
        range_stalled,
    )
}

# Every scenario by the kind of failure it is (the docstring says why one each suffices).
CLASSES: dict[str, tuple[str, ...]] = {
    "none": ("healthy",),
    "no cache": ("no-manifest",),
    "store unreachable": ("store-refused",),
    "deadline": ("store-stuck", "stuck-in-c", "range-stalled"),
    "bad data": ("nul-member", "huge-manifest", "huge-blob", "absurd-size"),
    "worker killed": ("worker-killed",),
    "bug": ("any-exception",),
    "I/O error": ("oserror-at-read",),
    "disk full": ("disk-full-space-check", "disk-full-at-download", "disk-full-at-install"),
    "config error": ("wrongly-typed-option",),
}
ENTRY_POINTS = ("pull --require", "run", "serve", "api")

# The scenarios whose fault is in the data path, run again with the store on S3.
S3_SCENARIOS = ("healthy", "worker-killed", "stuck-in-c", "disk-full-space-check",
                "disk-full-at-download", "disk-full-at-install", "nul-member", "huge-blob",
                "absurd-size", "oserror-at-read")  # fmt: skip


# -- issue #20's rows 2-4 and 6-8: hostile input, run through `pull`, `run` and `serve` ---

RAW = "RAW-YAML"  # a placeholder in the dumped config, for YAML that safe_dump cannot write


def unreadable(node: Node, key: str, raw: str) -> Node:
    """`node` whose workload's `key` is the YAML `raw`, verbatim. Such a config tells the
    node nothing, so the cache dir comes from $TORCHWARM_CACHE_DIR, as a pod's env gives it."""
    node.doc["workloads"] = [{**WORKLOAD, key: RAW}]
    node.text = yaml.safe_dump(node.doc).replace(RAW, raw)
    node.env["TORCHWARM_CACHE_DIR"] = str(node.cache_dir)
    return node


def deep_config(tmp_path, request):
    """Row 2: 500 nested YAML lists in a 1 KB config."""
    return unreadable(seeded(tmp_path), "model_kwargs", "[" * 500 + "]" * 500), "nested deeper"


def alias_config(tmp_path, request):
    """Row 3: ~20 KB of aliases that expand to millions of tensors, `deadline_s: 1`, read
    within a 2 GiB address space."""
    node = seeded(tmp_path)
    node.doc["deadline_s"] = 1
    node.preexec = limit_address_space
    return unreadable(node, "inputs", alias_bomb_inputs()), "expands to more than"


def deep_archive(tmp_path, request):
    """Row 4: an archive of folders 1,000 deep published for this node's fingerprint (the
    node trusts no keys, so it takes the unsigned manifest)."""
    deep = [Member("/".join(["d"] * i), type=tarfile.DIRTYPE, mode=0o755) for i in range(1, 1001)]
    blob = Captured("cachedir", hand_archive(tmp_path / "deep.tar.zst", deep), archive.MEDIA_TYPE)
    return seeded(tmp_path, captured=[blob]), "levels deep"


def no_threads(tmp_path, request):
    """Row 6: the node runs in a pids cgroup of one task, so no worker process and no thread
    can start (`serve`'s cells also hold idle connections, the row's other half)."""
    node = seeded(tmp_path)
    node.preexec = joining(request.getfixturevalue("pids_cgroups").procs(1))
    return node, "Resource temporarily unavailable"


def cache_dir_a_file(tmp_path, request):
    """Row 7: cache_dir is a regular file (which the node leaves as it is)."""
    node = seeded(tmp_path)
    node.cache_dir.write_bytes(b"an operator's file")
    return node, "is not a folder"


def huge_deadline(tmp_path, request):
    """Row 8: `deadline_s: 1e10`, past its bound of a day."""
    node = seeded(tmp_path)
    node.doc["deadline_s"] = 1e10
    return node, "deadline_s is 10000000000.0; expected a positive number of seconds, at most 86400"


ROWS: dict[str, Callable[..., tuple[Node, str | None]]] = {
    f.__name__.replace("_", "-"): f
    for f in (deep_config, alias_config, deep_archive, no_threads, cache_dir_a_file, huge_deadline)
}


def cells(local: list[str], s3: tuple[str, ...]) -> list[Any]:
    """(scenario, backend) parameters: `local`'s scenarios on a local folder, `s3`'s on
    SeaweedFS (ids `s3-NAME`)."""
    return [pytest.param(n, "local", id=n) for n in local] + [
        pytest.param(n, "s3", id=f"s3-{n}") for n in s3
    ]


def one_per_class(entry_point: str) -> list[str]:
    """One scenario of each class for `entry_point`, taken in turn, so that the entry points
    between them cover a class's other scenarios too."""
    turn = ENTRY_POINTS.index(entry_point)
    return sorted(names[turn % len(names)] for names in CLASSES.values())


def reasons(doc: dict) -> list[str]:
    return [doc["reason"]] if doc.get("reason") else [w["reason"] for w in doc["workloads"]]


def volume(cache_dir: Path) -> dict[str, bytes] | bytes:
    """What is at `cache_dir`: its tree, or the bytes of the file that is there."""
    return cache_dir.read_bytes() if cache_dir.is_file() else tree(cache_dir)


def assert_cold(node: Node, why: str) -> None:
    """The marker says cold and why, in one line each; the cache dir is as it was, and no
    staging folder is left beside it."""
    doc = json.loads(node.marker.read_text())
    assert doc["status"] == "cold"
    assert all(r and "\n" not in r for r in reasons(doc))
    assert any(why in r for r in reasons(doc)), reasons(doc)
    assert volume(node.cache_dir) == node.before
    assert not list(workdir(node.cache_dir).glob("staging-*"))
    if node.judged:  # else one may stay from S3 (a kill, an I/O error), for the next pull
        assert not partials(node)


def assert_warm(node: Node) -> None:
    assert json.loads(node.marker.read_text())["status"] == "warm"
    assert tree(node.cache_dir) == CACHE  # exactly the manifest's tree: PREVIOUS is gone
    assert not partials(node)  # verified: its partial copy is deleted


def partials(node: Node) -> list[Path]:
    """The partial copies of blobs in the node's workdir (kept from S3 for resume)."""
    return list(fetch.partials_dir(workdir(node.cache_dir)).glob("*"))


@pytest.fixture
def pids_cgroups() -> Iterator[PidsCgroups]:
    """New pids cgroups for the test, removed after it."""
    groups = PidsCgroups()
    yield groups
    groups.close()


@pytest.fixture
def backend() -> str:
    """Where `seeded()` publishes: a local folder, unless a test parametrizes "s3"."""
    return "local"


@pytest.fixture
def scenario(request, tmp_path) -> tuple[Node, str | None]:
    """The node of the scenario (or row) named by the test's parameter, over an earlier
    boot's tree unless the scenario put something else at the cache dir."""
    node, why = {**SCENARIOS, **ROWS}[request.param](tmp_path, request)
    node.env.update(inject_env())
    if not node.cache_dir.exists():
        make_tree(node.cache_dir, PREVIOUS)  # an earlier boot's tree, to keep intact
    node.before = volume(node.cache_dir)
    return node, why


def test_every_scenario_has_one_class():
    """The classes name each scenario once, so that one_per_class() misses none."""
    named = [n for names in CLASSES.values() for n in names]
    assert sorted(named) == sorted(SCENARIOS)


@pytest.mark.parametrize(("scenario", "backend"),
                         cells(sorted(SCENARIOS) + sorted(ROWS), S3_SCENARIOS),
                         indirect=["scenario"])  # fmt: skip
def test_pull_fail_open(scenario, backend):
    """`pull`: exit 0, one `starting cold` line, a cold marker saying why, tree untouched."""
    node, why = scenario
    t0 = time.monotonic()
    proc = node.run("pull", "-c", str(node.config))
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < DEADLINE + 2  # the hard bound, interpreter start included
    if why is None:
        return assert_warm(node)
    assert "starting cold" in proc.stdout and why in proc.stdout
    assert_cold(node, why)


@pytest.mark.parametrize(("scenario", "backend"),
                         cells(one_per_class("pull --require"), S3_SCENARIOS),
                         indirect=["scenario"])  # fmt: skip
def test_pull_fail_closed(scenario, backend):
    """`pull --require`: non-zero, one line on stderr, nothing installed, no marker."""
    node, why = scenario
    proc = node.run("pull", "-c", str(node.config), "--require")
    if why is None:
        return assert_warm(node)
    assert proc.returncode != 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0], lines
    assert not node.marker.exists() and tree(node.cache_dir) == PREVIOUS


APP = "import os; print('APP RAN with', os.environ.get('TORCHINDUCTOR_CACHE_DIR'))"


@pytest.mark.parametrize("scenario", one_per_class("run") + sorted(ROWS), indirect=True)
def test_run_fail_open(scenario):
    """`run -- APP`: the app runs, with the cache dir set, within deadline + 2 s, whatever
    the pull met."""
    node, why = scenario
    t0 = time.monotonic()
    proc = node.run("run", "-c", str(node.config), "--", sys.executable, "-c", APP)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < DEADLINE + 2  # the app included: it only prints
    assert f"APP RAN with {node.cache_dir}" in proc.stdout
    if why is None:
        return assert_warm(node)
    assert "starting cold" in proc.stderr
    assert_cold(node, why)


@pytest.mark.parametrize("scenario", one_per_class("serve") + sorted(ROWS), indirect=True)
def test_serve_fail_open(scenario):
    """`serve`: /readyz turns 200 (ready: cold) within deadline + 2 s and still answers while
    a peer holds 400 idle connections, and SIGTERM exits 0."""
    node, why = scenario
    port = free_port()
    t0 = time.monotonic()
    proc = node.spawn("serve", "-c", str(node.config), "--listen", f"127.0.0.1:{port}")
    try:
        status, body = wait_ready(port, proc, DEADLINE + 10)
        assert status == 200, body
        assert time.monotonic() - t0 < DEADLINE + 2  # ready (warm or cold) by the bound
        assert body.strip() == ("ready: warm" if why is None else "ready: cold")
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(400)]
        try:
            assert readyz(port) == (status, body)
        finally:
            for s in held:
                s.close()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    if why is None:
        return assert_warm(node)
    assert_cold(node, why)


@pytest.mark.parametrize("command", ["pull", "run", "serve"])
@pytest.mark.parametrize("scenario", ["huge-deadline"], indirect=True)
def test_require_names_the_bound(scenario, command):
    """Row 8 with `--require`: `pull`, `run` and `serve` exit 2 with one line naming the key
    and its bound; no app, nothing installed, no marker."""
    node, why = scenario
    rest = {"pull": [], "run": ["--", sys.executable, "-c", APP],
            "serve": ["--listen", f"127.0.0.1:{free_port()}"]}[command]  # fmt: skip
    proc = node.run(command, "-c", str(node.config), "--require", *rest)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0], lines
    assert "APP RAN" not in proc.stdout
    assert not node.marker.exists() and tree(node.cache_dir) == PREVIOUS


API = """\
    import json, sys
    import torchwarm
    print(json.dumps(torchwarm.pull(sys.argv[1]).to_dict()))
"""


@pytest.mark.parametrize("scenario", one_per_class("api"), indirect=True)
def test_api_fail_open(scenario):
    """`torchwarm.pull(config)` in the app's process: it returns (never raises) within
    deadline + 2 s, a cold report where the pull failed, and the marker says why."""
    node, why = scenario
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(API), str(node.config)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **node.env})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < DEADLINE + 2  # the interpreter's start included
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if why is None:
        assert report["status"] == "warm"
        return assert_warm(node)
    assert report["status"] == "cold"
    assert_cold(node, why)


def test_one_workload_that_fails_leaves_the_others_warm(tmp_path):
    """Two workloads, one of whose blobs cannot be installed: the other is installed and
    warm, the failing one starts cold and says why."""
    node = seeded(tmp_path)
    evil = hostile_archive(tmp_path / "evil.tar.zst")
    m, files = build_manifest("evil", fingerprint.collect(), "cachedir", [evil], {})
    publish(LocalStore(tmp_path / "store"), m, files)
    node.doc["workloads"] = [WORKLOAD, {**WORKLOAD, "name": "evil"}]
    proc = node.run("pull", "-c", str(node.config))
    assert proc.returncode == 0
    doc = json.loads(node.marker.read_text())
    assert doc["status"] == "partial"
    by_name = {w["workload"]: w for w in doc["workloads"]}
    assert by_name["mlp"]["status"] == "warm" and by_name["evil"]["status"] == "cold"
    assert "NUL" in by_name["evil"]["reason"]
    assert tree(node.cache_dir) == CACHE
