"""The seed daemon against S3 (SeaweedFS behind a proxy that records every request).

One module fixture runs three `--once` passes over one store and keeps their events and
the requests the store saw: pass 1 warms two workloads (a compiled model and a command),
pass 2 finds both current, pass 3 follows an edit to the model's input sets and adds one
whose model does not import. Other tests start long-running daemons and signal them, or
run workloads from test model modules (written per test, on PYTHONPATH) that raise, hang
or look around. Where a claim is about the daemon and not about torch (a stuck upload, a
forged manifest), the workload is tests/cmd_app.py, a command that compiles nothing.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import spawn, torchwarm
from factories import COMMAND, COMMAND_ENV, INJECT, alive, inject_env
from faultproxy import FaultProxy, _ProxyHandler
from servers import BUCKET, FAKE_AWS_ENV, S3Server, free_port, s3_client

pytestmark = pytest.mark.usefixtures("trust_the_vector_isa")

TINY = {
    "name": "tiny",
    "model": "torchwarm.models:mlp",
    "model_kwargs": {"d_in": 8, "hidden": 8, "d_out": 8},
    "inputs": [[{"shape": [2, 8], "dtype": "float32"}]],
}
BROKEN = {
    "name": "broken",
    "model": "torchwarm_no_such_module:build",
    "inputs": [[{"shape": [2, 8], "dtype": "float32"}]],
}
S3_OPTIONS = {"path_style": True, "request_checksum_calculation": "when_required",
              "region": "us-east-1"}  # fmt: skip


# -- helpers ----------------------------------------------------------------------------


@dataclass
class Setup:
    """A daemon config for s3://BUCKET/<prefix> reached through `endpoint`."""

    config: Path
    endpoint: str  # what the daemon talks to
    direct: str  # the S3 server itself, for the test's own reads
    prefix: str
    doc: dict[str, Any] = field(default_factory=dict)

    def write(self, workloads: list[dict[str, Any]], **daemon: Any) -> None:
        self.doc["workloads"] = workloads
        if daemon:
            self.doc["daemon"] = daemon
        self.config.write_text(yaml.safe_dump(self.doc))

    def objects(self) -> dict[str, tuple[int, Any]]:
        """Every object under the prefix: key -> (size, LastModified), read from the store."""
        pages = (
            s3_client(self.direct)
            .get_paginator("list_objects_v2")
            .paginate(Bucket=BUCKET, Prefix=f"{self.prefix}/")
        )
        return {
            o["Key"][len(self.prefix) + 1 :]: (o["Size"], o["LastModified"])
            for p in pages
            for o in p.get("Contents", [])
        }

    def manifest(self, key: str) -> dict[str, Any]:
        obj = s3_client(self.direct).get_object(Bucket=BUCKET, Key=f"{self.prefix}/{key}")
        return json.loads(obj["Body"].read())


def make_setup(tmp: Path, endpoint: str, direct: str) -> Setup:
    prefix = f"daemon-{uuid.uuid4().hex[:12]}"
    doc = {
        "store": f"s3://{BUCKET}/{prefix}",
        "store_options": {"endpoint_url": endpoint, **S3_OPTIONS},
        "cache_dir": str(tmp / "cache" / "inductor"),
        "env": COMMAND_ENV,
    }
    return Setup(tmp / "config.yaml", endpoint, direct, prefix, doc)


def events_of(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def daemon_once(config: Path, rc: int = 0) -> list[dict[str, Any]]:
    proc = torchwarm("daemon", "-c", str(config), "--once", env=FAKE_AWS_ENV, check=False)
    assert proc.returncode == rc, f"{proc.stdout}\n{proc.stderr}"
    return events_of(proc)


def named(events: list[dict[str, Any]], event: str) -> dict[str, dict[str, Any]]:
    """The events called `event`, by workload."""
    return {e["workload"]: e for e in events if e["event"] == event}


def puts(seen: list[tuple[str, str]]) -> list[str]:
    return [path for method, path in seen if method in ("PUT", "POST")]


class LiveDaemon:
    """A long-running `torchwarm daemon` whose JSON events are read as they are printed."""

    def __init__(self, config: Path, *args: str) -> None:
        self.proc = spawn("daemon", "-c", str(config), *args, env=FAKE_AWS_ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        self.events: list[dict[str, Any]] = []
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self._q.put(json.loads(line))
        self._q.put(None)

    def wait_for(self, event: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                e = self._q.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {event!r} within {timeout} s: {self.events}") from None
            if e is None:
                raise AssertionError(f"daemon exited before {event!r}: {self.events}")
            self.events.append(e)
            if e["event"] == event:
                return e

    def stop(self, timeout: float = 10) -> tuple[int, float]:
        """SIGTERM; return (exit code, seconds until exit)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"(\S+) (\S+)", line)
        if m and not line.startswith("#"):
            out[m[1]] = float(m[2])
    return out


class _StallHandler(_ProxyHandler):
    """Forwards like the fault proxy, but holds every request the server's `holds` picks
    until `release` is set."""

    server: StallProxy

    def _forward(self) -> None:
        if self.server.holds(self.command, self.path):
            self._body()
            self.server.stalled.set()
            self.server.release.wait(120)
            self.close_connection = True
            return
        super()._forward()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


def blob_put(method: str, path: str) -> bool:
    return method == "PUT" and "/blobs/sha256/" in path


def manifest_get(method: str, path: str) -> bool:
    return method == "GET" and "/manifests/" in path


class StallProxy(FaultProxy):
    def __init__(self, upstream_port: int, holds: Callable[[str, str], bool] = blob_put) -> None:
        super().__init__(upstream_port)
        self.RequestHandlerClass = _StallHandler
        self.holds = holds
        self.stalled = threading.Event()
        self.release = threading.Event()


# -- three --once passes over one store -------------------------------------------------


@dataclass
class Passes:
    setup: Setup
    events: list[list[dict[str, Any]]]  # per pass
    seen: list[list[tuple[str, str]]]  # requests the store saw, per pass
    before_second: dict[str, tuple[int, Any]]  # the store's objects after pass 1
    first_manifests: dict[str, dict[str, Any]]  # the manifests after pass 1
    after_second: dict[str, tuple[int, Any]]


@pytest.fixture(scope="module")
def passes(
    tmp_path_factory: pytest.TempPathFactory, fault_proxy: FaultProxy, seaweedfs_server: S3Server
) -> Passes:
    """Pass 1 on an empty store (`cmd` and `tiny`), pass 2 unchanged, pass 3 after editing
    `tiny` and adding a workload that cannot import."""
    fault_proxy.reset()
    setup = make_setup(
        tmp_path_factory.mktemp("daemon"), fault_proxy.endpoint, seaweedfs_server.endpoint
    )
    setup.write([COMMAND, TINY])
    events, seen = [], []

    def run(rc: int = 0) -> None:
        start = len(fault_proxy.seen)
        events.append(daemon_once(setup.config, rc))
        seen.append(fault_proxy.seen[start:])

    run()
    before = setup.objects()
    first = {k: setup.manifest(k) for k in before if k.startswith("manifests/")}
    run()
    after = setup.objects()
    tiny = copy.deepcopy(TINY)
    tiny["inputs"].append([{"shape": [3, 8], "dtype": "float32"}])
    setup.write([BROKEN, COMMAND, tiny])
    run(rc=7)  # --once reports the failed workload to the Job, after handling the others
    return Passes(setup, events, seen, before, first, after)


@pytest.mark.compile
def test_first_pass_warms_and_publishes_both_workloads(passes):
    """Pass 1 on an empty store warms both workloads (compiles the model, runs the command)
    and publishes a manifest for each."""
    ev = passes.events[0]
    assert set(named(ev, "warmup_started")) == {"cmd", "tiny"}
    published = named(ev, "published")
    assert set(published) == {"cmd", "tiny"}
    assert all(p["outcome"] == "published" and p["bytes_pushed"] > 0 for p in published.values())
    manifests = passes.first_manifests
    assert sorted(k.split("/")[2] for k in manifests) == ["cmd", "tiny"]
    for doc in manifests.values():
        for b in doc["blobs"]:
            assert f"blobs/sha256/{b['sha256'][:2]}/{b['sha256']}" in passes.before_second
    assert [e["event"] for e in ev[-2:]] == ["pass_finished", "stopped"]
    assert ev[-1]["passes"] == 1 and ev[-1]["abandoned"] is False


@pytest.mark.compile
def test_second_pass_compiles_nothing_and_uploads_nothing(passes):
    """Pass 2 skips both workloads: no warm-up, no PUT at the store, no object changed."""
    ev = passes.events[1]
    assert set(named(ev, "skipped_present")) == {"cmd", "tiny"}
    assert not named(ev, "warmup_started") and not named(ev, "published")
    assert passes.seen[1], "pass 2 never reached the store"
    assert puts(passes.seen[1]) == []
    assert passes.after_second == passes.before_second


@pytest.mark.compile
def test_editing_one_workloads_inputs_rewarms_only_that_one(passes):
    """Pass 3, after `tiny` gained an input set, re-warms `tiny` alone and replaces its manifest."""
    ev = passes.events[2]
    assert list(named(ev, "warmup_started")) == ["tiny"]
    assert list(named(ev, "skipped_present")) == ["cmd"]
    (pub,) = named(ev, "published").values()
    assert pub["workload"] == "tiny" and pub["outcome"] == "replaced"
    shapes = [s[0]["shape"] for s in passes.setup.manifest(pub["manifest"])["warmup"]["input_sets"]]
    assert shapes == [[2, 8], [3, 8]]


@pytest.mark.compile
def test_unimportable_model_fails_and_backs_off_while_others_publish(passes):
    """In pass 3 `broken` (listed first) fails with a 60 s retry, and `tiny` is still published."""
    ev = passes.events[2]
    fail = named(ev, "warmup_failed")
    assert list(fail) == ["broken"]
    assert "torchwarm_no_such_module" in fail["broken"]["error"]
    assert fail["broken"]["retry_in_s"] == 60
    order = [e["event"] for e in ev]
    assert order.index("warmup_failed") < order.index("published")
    assert not any(k.split("/")[2] == "broken" for k in passes.setup.objects() if "manifests/" in k)


# -- long-running daemons ---------------------------------------------------------------


@pytest.mark.compile
def test_metrics_move_across_a_pass_and_a_failing_workload_backs_off(passes):
    """/metrics before and after each pass: passes and skips count up, `broken` fails once,
    then backs off on the next pass; SIGTERM exits 0."""
    port = free_port()
    passes.setup.write([BROKEN, COMMAND, passes.setup.doc["workloads"][2]],
                       interval_s=2, jitter=0.0)  # fmt: skip
    d = LiveDaemon(passes.setup.config, "--listen", f"127.0.0.1:{port}")
    try:
        assert d.wait_for("listening", 60)["address"] == f"127.0.0.1:{port}"
        before = scrape(port)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").status == 200
        d.wait_for("pass_finished")
        after = scrape(port)
        d.wait_for("pass_finished", 30)
        second = scrape(port)
        code, seconds = d.stop()
    finally:
        d.kill()
    assert before["torchwarm_daemon_passes_total"] == 0
    assert before['torchwarm_daemon_skipped_total{workload="cmd"}'] == 0
    assert after["torchwarm_daemon_passes_total"] == 1
    assert second["torchwarm_daemon_passes_total"] == 2
    for w in ("cmd", "tiny"):
        assert after[f'torchwarm_daemon_skipped_total{{workload="{w}"}}'] == 1
        assert second[f'torchwarm_daemon_skipped_total{{workload="{w}"}}'] == 2
        assert second[f'torchwarm_daemon_warmups_total{{workload="{w}"}}'] == 0
    assert after['torchwarm_daemon_failures_total{workload="broken"}'] == 1
    assert second['torchwarm_daemon_failures_total{workload="broken"}'] == 1
    assert [e["workload"] for e in d.events if e["event"] == "backing_off"] == ["broken"]
    assert code == 0 and seconds < 10


def test_sigterm_during_a_stuck_upload_exits_0_and_leaves_no_dangling_manifest(
    tmp_path, seaweedfs_server
):
    """SIGTERM while the store holds a blob PUT: exit 0 within 10 s, no manifest names a
    missing blob."""
    proxy = StallProxy(int(seaweedfs_server.endpoint.rsplit(":", 1)[1]))
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    setup = make_setup(tmp_path, proxy.endpoint, seaweedfs_server.endpoint)
    setup.write([COMMAND])
    d = LiveDaemon(setup.config)
    try:
        d.wait_for("warmup_finished", 180)
        assert proxy.stalled.wait(30), "the daemon never started a blob upload"
        code, seconds = d.stop()
        stopped = d.wait_for("stopped", 5)
    finally:
        d.kill()
        proxy.release.set()
        proxy.shutdown()
        proxy.server_close()
    assert code == 0 and seconds < 10, (code, seconds)
    assert stopped["abandoned"] is True
    assert not named(d.events, "published")
    objects = setup.objects()
    for key in (k for k in objects if k.startswith("manifests/")):
        for b in setup.manifest(key)["blobs"]:
            assert f"blobs/sha256/{b['sha256'][:2]}/{b['sha256']}" in objects, key


@pytest.mark.compile
def test_skipped_manifest_older_than_refresh_s_is_touched_once(passes, tmp_path):
    """A current manifest 8 days old (past daemon.refresh_s, 7 days) is touched by the next
    pass, bytes unchanged; the pass after it touches nothing (local copy of the store)."""
    store = tmp_path / "store"
    (key,) = (k for k in passes.first_manifests if k.split("/")[2] == "cmd")
    doc = passes.setup.manifest(key)
    wanted = [key] + [f"blobs/sha256/{b['sha256'][:2]}/{b['sha256']}" for b in doc["blobs"]]
    client = s3_client(passes.setup.direct)
    for k in wanted:
        body = client.get_object(Bucket=BUCKET, Key=f"{passes.setup.prefix}/{k}")["Body"]
        (store / k).parent.mkdir(parents=True, exist_ok=True)
        (store / k).write_bytes(body.read())
    manifest, before = store / key, (store / key).read_bytes()
    eight_days_ago = time.time() - 8 * 86400
    os.utime(manifest, (eight_days_ago, eight_days_ago))
    # The seed's cache_dir: a command warms up at that path, which is in its warm-up key.
    config = local_config(tmp_path, [COMMAND], env=COMMAND_ENV,
                          cache_dir=passes.setup.doc["cache_dir"])  # fmt: skip
    first = daemon_once(config)
    touched = manifest.stat().st_mtime_ns
    second = daemon_once(config)
    assert list(named(first, "skipped_present")) == ["cmd"]
    assert named(first, "manifest_refreshed")["cmd"]["age_s"] >= 8 * 86400
    assert time.time() - touched / 1e9 < 600 and manifest.read_bytes() == before
    assert list(named(second, "skipped_present")) == ["cmd"]
    assert not named(second, "manifest_refreshed")
    assert manifest.stat().st_mtime_ns == touched


# -- failures: any error is an event, --once says so, hung steps are cut ------------------


TEST_MODELS = {
    "tw_boom/__init__.py": "",
    "tw_seedmodels.py": """\
import json, os, subprocess, sys, time


def hang(pids):
    \"\"\"Start a grandchild, write both pids, never return.\"\"\"
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(pids + ".tmp", "w") as f:
        json.dump({"child": os.getpid(), "grandchild": grandchild.pid}, f)
    os.rename(pids + ".tmp", pids)
    time.sleep(600)


def spy(out):
    \"\"\"Write what the warm-up child was given (environment, command line), then fail.\"\"\"
    with open(out, "w") as f:
        json.dump({"env": dict(os.environ), "argv": sys.argv}, f)
    raise RuntimeError("spied on the warm-up child")
""",
}
BOOM = {"name": "boom", "model": "tw_boom.model:build", "inputs": TINY["inputs"]}


def hang(pids: Path, **extra: Any) -> dict[str, Any]:
    return {"name": "hang", "model": "tw_seedmodels:hang", "model_kwargs": {"pids": str(pids)},
            "inputs": TINY["inputs"], **extra}  # fmt: skip


@pytest.fixture
def models_env(tmp_path: Path) -> dict[str, str]:
    """The fake AWS credentials, and PYTHONPATH holding TEST_MODELS."""
    root = tmp_path / "models"
    for rel, text in TEST_MODELS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    return {**FAKE_AWS_ENV, "PYTHONPATH": path}


def local_config(tmp_path: Path, workloads: list[dict[str, Any]], **top: Any) -> Path:
    config = tmp_path / "config.yaml"
    doc = {"store": (tmp_path / "store").as_uri(), "workloads": workloads,
           "cache_dir": str(tmp_path / "cache" / "inductor"), **top}  # fmt: skip
    config.write_text(yaml.safe_dump(doc))
    return config


def test_once_exits_7_when_workloads_fail_for_any_reason(tmp_path, models_env):
    """`boom` raises a RuntimeError inside the daemon (injected where its warm-up key hashes
    its package), `hang` passes warmup_timeout_s: both are warmup_failed events, the pass
    goes on, and `daemon --once` exits 7 naming them."""
    pids = tmp_path / "pids.json"
    config = local_config(tmp_path, [BOOM, hang(pids)], warmup_timeout_s=10)
    boom = {**inject_env("torchwarm.env.codeid:code_identity:raise"),
            "TORCHWARM_TEST_INJECT_ONLY": "tw_boom"}  # fmt: skip
    boom["PYTHONPATH"] = os.pathsep.join([str(INJECT), models_env["PYTHONPATH"]])
    proc = torchwarm("daemon", "-c", str(config), "--once", env={**models_env, **boom},
                     check=False)  # fmt: skip
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 7, proc.stdout + proc.stderr
    failed = named(events, "warmup_failed")
    assert failed["boom"]["error_type"] == "RuntimeError"
    assert "internal error: RuntimeError: injected fault" in failed["boom"]["error"]
    assert "did not finish within 10 s (warmup_timeout_s)" in failed["hang"]["error"]
    assert [e["event"] for e in events[-2:]] == ["pass_finished", "stopped"]
    assert "Traceback" in proc.stderr  # the unexpected error's, for a bug report
    assert "2 workload(s) failed: boom, hang" in proc.stderr.splitlines()[-1]
    assert not any(alive(p) for p in json.loads(pids.read_text()).values())


def test_warmup_past_its_timeout_is_killed_with_its_children(tmp_path, models_env):
    """`torchwarm warmup`: a workload's own warmup_timeout_s kills the child and the process
    it started; exit 7 with the timeout and the log, which stays where it says."""
    pids = tmp_path / "pids.json"
    config = local_config(tmp_path, [hang(pids, warmup_timeout_s=10)])
    t0 = time.monotonic()
    proc = torchwarm("warmup", "-c", str(config), "--out", str(tmp_path / "out"), env=models_env,
                     check=False)  # fmt: skip
    seconds = time.monotonic() - t0
    assert proc.returncode == 7, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert "warm-up of 'hang' did not finish within 10 s (warmup_timeout_s)" in line
    assert line.endswith(f"(full log: {tmp_path / 'out' / 'hang' / 'warmup.log'})")
    assert (tmp_path / "out" / "hang" / "warmup.log").is_file()
    assert seconds >= 10
    started = json.loads(pids.read_text())
    assert not alive(started["child"]) and not alive(started["grandchild"]), started


def test_warmup_child_holds_no_signing_key(tmp_path, models_env):
    """The warm-up child runs the user's model code: it gets neither $TORCHWARM_SIGNING_KEY
    nor any TORCHWARM_* variable, and no config path (its workload comes as JSON)."""
    from torchwarm.spec import signing

    secret, _ = signing.generate("seed-1")
    seen = tmp_path / "seen.json"
    spy = {"name": "spy", "model": "tw_seedmodels:spy", "model_kwargs": {"out": str(seen)},
           "inputs": TINY["inputs"]}  # fmt: skip
    config = local_config(tmp_path, [spy])
    env = {**models_env, "TORCHWARM_SIGNING_KEY": secret, "TORCHWARM_FORMAT": "cachedir"}
    proc = torchwarm("warmup", "-c", str(config), "--push", env=env, check=False)
    assert proc.returncode == 7 and "spied on the warm-up child" in proc.stderr, proc.stderr
    child = json.loads(seen.read_text())
    assert not [k for k in child["env"] if k.startswith("TORCHWARM_")]
    key_text = secret.split(":", 1)[1]
    assert not [k for k, v in child["env"].items() if key_text in v]
    assert not [a for a in child["argv"] if str(config) in a or key_text in a]
    assert "--workload-json" in child["argv"]


def test_error_outside_the_workloads_fails_the_pass_not_the_daemon(tmp_path):
    """`--workload nosuch`: each pass fails (event pass_failed, 60 s backoff) and the daemon
    keeps running until SIGTERM (exit 0); with --once the error's own exit code, 2."""
    config = local_config(tmp_path, [TINY])
    once = torchwarm("daemon", "-c", str(config), "--once", "--workload", "nosuch", check=False)
    assert once.returncode == 2
    d = LiveDaemon(config, "--workload", "nosuch")
    try:
        failed = d.wait_for("pass_failed", 120)
        d.wait_for("pass_finished", 10)
        time.sleep(1)
        running = d.proc.poll() is None
        code, _ = d.stop()
    finally:
        d.kill()
    assert "no workload named 'nosuch'" in failed["error"]
    assert failed["error_type"] == "ConfigError" and failed["retry_in_s"] == 60
    assert running and code == 0


def test_healthz_says_503_when_a_step_runs_past_its_timeout(tmp_path, seaweedfs_server):
    """The store holds the daemon's manifest read: /healthz is 200 at first, then 503 with
    a one-line reason once the step has run past warmup_timeout_s (2 s) plus the margin."""
    proxy = StallProxy(int(seaweedfs_server.endpoint.rsplit(":", 1)[1]), holds=manifest_get)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    setup = make_setup(tmp_path, proxy.endpoint, seaweedfs_server.endpoint)
    setup.doc["warmup_timeout_s"] = 2
    setup.write([TINY])
    port = free_port()
    d = LiveDaemon(setup.config, "--listen", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        d.wait_for("listening", 60)
        first = urllib.request.urlopen(url, timeout=5).status
        assert proxy.stalled.wait(120), "the daemon never read its manifest"
        deadline, answer = time.monotonic() + 60, None
        while answer is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url, timeout=5)
                time.sleep(0.5)
            except urllib.error.HTTPError as e:
                answer = (e.code, e.read().decode())
        code, _ = d.stop()
    finally:
        d.kill()
        proxy.release.set()
        proxy.shutdown()
        proxy.server_close()
    assert first == 200
    assert answer is not None, "/healthz stayed 200"
    status, body = answer
    assert status == 503 and body.count("\n") == 1, body
    assert body.startswith("stuck: workload 'tiny': checking the store has run "), body
    assert "past its 2 s timeout (warmup_timeout_s)" in body
    assert code == 0


def test_daemon_repairs_a_manifest_forged_under_its_key_name(tmp_path):
    """A manifest whose signature names the seed's key but does not verify (a forgery left
    by someone with bucket access): `daemon --once` does not skip it but warms up and
    publishes one that verifies, with a higher serial; the next pass then skips."""
    from torchwarm.spec import keys as keytree
    from torchwarm.spec import manifest as mf
    from torchwarm.spec import signing
    from torchwarm.stores.local import LocalStore

    secret, public = signing.generate("seed-1")
    trusted = signing.load_trusted([public], "test")
    config = local_config(tmp_path, [COMMAND], env=COMMAND_ENV)
    env = {"TORCHWARM_SIGNING_KEY": secret}
    torchwarm("daemon", "-c", str(config), "--once", env=env)  # raises unless it exits 0
    store = LocalStore(tmp_path / "store")
    (info,) = [i for i in store.list(keytree.MANIFESTS)]
    good = mf.parse(store.read(info.key, mf.MAX_MANIFEST_BYTES).data, info.key)
    forged_sig = {**(good.signature or {}), "value": good.signature["value"][::-1]}
    forged = mf.Manifest(**{**good.__dict__, "signature": forged_sig, "created_by": "mallory"})
    store.put(info.key, forged.to_json())
    with pytest.raises(Exception, match="does not match its content"):
        signing.verify(forged, trusted, info.key)
    second = torchwarm("daemon", "-c", str(config), "--once", env=env, check=False)
    assert second.returncode == 0, second.stderr
    events = [json.loads(line)["event"] for line in second.stdout.splitlines()]
    assert "published" in events and "skipped_present" not in events
    repaired = mf.parse(store.read(info.key, mf.MAX_MANIFEST_BYTES).data, info.key)
    signing.verify(repaired, trusted, info.key)  # raises if it does not verify
    assert repaired.serial > good.serial
    third = torchwarm("daemon", "-c", str(config), "--once", env=env, check=False)
    assert "skipped_present" in [json.loads(line)["event"] for line in third.stdout.splitlines()]
