"""The fleet seeds itself, end to end with real compiles: two fresh nodes with one
fingerprint and an empty store, no seed. Node 1's app starts cold and compiles; its
cache is published once; node 2 pulls it and its app's compiles hit, by the app's own
torch counters. Once with a batch app under `run --publish`, once with the FastAPI
example beside `serve --publish`.

Both nodes use the same cache_dir path, one after the other, and node 1's folder is
deleted before node 2 starts: a fresh machine, as a fleet's nodes are.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import cli_env, spawn, torchwarm, wait_ready
from servers import free_port

from torchwarm.spec import signing

pytestmark = pytest.mark.usefixtures("trust_the_vector_isa")

REPO = Path(__file__).resolve().parent.parent
MLP = REPO / "examples" / "compile_mlp.py"
SERVER = REPO / "examples" / "server_app.py"


@pytest.fixture
def fleet(tmp_path: Path) -> dict[str, Any]:
    """A store, a node folder, a node key that the nodes trust for node publishes, and the
    seed key they trust too (no seed runs: a node trusting node keys must trust one)."""
    secret, public = signing.generate("node-1")
    key = tmp_path / "node-1.secret"
    key.write_text(secret + "\n")
    seed_public = signing.generate("seed-1")[1]
    return {"store": tmp_path / "store", "node": tmp_path / "node", "key": key, "pub": public,
            "seed_pub": seed_public}  # fmt: skip


def config(tmp_path: Path, fleet: dict[str, Any], **publish: Any) -> Path:
    doc = {
        "store": str(fleet["store"]),
        "cache_dir": str(fleet["node"] / "inductor"),
        "node_key_file": str(fleet["key"]),
        "trusted_keys": [fleet["seed_pub"]],
        "trusted_node_keys": [fleet["pub"]],
        "workloads": [{"name": "app", "command": [sys.executable, str(MLP)]}],
    }
    if publish:
        doc["publish"] = publish
    path = tmp_path / f"torchwarm-{len(publish)}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def manifests(fleet: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in fleet["store"].rglob("manifests/**/*.json")]


def report(stdout: str) -> dict[str, int]:
    """The counters of compile_mlp.py's `torchwarm_report` line."""
    (line,) = [ln for ln in stdout.splitlines() if "torchwarm_report" in ln]
    return json.loads(line)["torchwarm_report"]["counters"]


def fresh(fleet: dict[str, Any]) -> None:
    """Node 1's machine is gone: the next node starts with nothing on disk."""
    shutil.rmtree(fleet["node"])


@pytest.mark.compile
def test_a_batch_app_under_run_publish_warms_the_next_node(tmp_path, fleet):
    """Node 1 runs the app under `run --publish`: cold, compiles, exits 0, published once;
    node 2 pulls it, and its app's FX-graph and AOTAutograd lookups all hit."""
    path = config(tmp_path, fleet)
    first = torchwarm("run", "-c", str(path), "--publish", "--", sys.executable, str(MLP),
                      timeout=600)  # fmt: skip
    c = report(first.stdout)
    assert c["fxgraph_cache_miss"] == 2 and c["fxgraph_cache_hit"] == 0, c  # cold
    assert "starting cold: app: no cache for workload 'app'" in first.stderr
    assert first.stderr.count("publish: published app (the app exited 0)") == 1, first.stderr
    (m,) = manifests(fleet)
    assert m["publisher"] == "node" and m["signature"]["key"] == "node-1"
    assert m["warmup"]["captured_from"] == "app"

    fresh(fleet)
    second = torchwarm("run", "-c", str(path), "--publish", "--", sys.executable, str(MLP),
                       timeout=600)  # fmt: skip
    c = report(second.stdout)
    assert c["fxgraph_cache_hit"] == 2 and c["fxgraph_cache_miss"] == 0, c
    assert c["autograd_cache_hit"] == 2 and c["autograd_cache_miss"] == 0, c
    assert "warm: app (cachedir" in second.stderr
    assert "publish:" not in second.stderr  # warm from the store: nothing to publish
    assert len(manifests(fleet)) == 1


def wait_for(url: str, proc: subprocess.Popen[str], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)


def predict(port: int) -> dict[str, Any]:
    """One POST /predict (the first compiles, or hits), then the app's own /stats."""
    url = f"http://127.0.0.1:{port}"
    body = json.dumps({"input_ids": [[1, 2, 3, 4]]}).encode()
    ask = urllib.request.Request(f"{url}/predict", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(ask, timeout=300) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"{url}/stats", timeout=10) as r:
        return json.load(r)


def published(agent_port: int) -> float:
    """torchwarm_publish_total{outcome="published"} on the sidecar's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{agent_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    key = 'torchwarm_publish_total{outcome="published"}'
    (line,) = [ln for ln in text.splitlines() if ln.startswith(key)]
    return float(line.split()[-1])


class Pod:
    """The sidecar (`torchwarm serve`) and the app container (the FastAPI example on
    `app_port`, its TORCHINDUCTOR_CACHE_DIR on the shared volume), each a process."""

    def __init__(self, log: Path, path: Path, cache_dir: Path, app_port: int,
                 *serve_args: str) -> None:  # fmt: skip
        self.log, self.agent_port, self.app_port = log, free_port(), app_port
        out = log.open("w")
        self.agent = spawn("serve", "-c", str(path), "--listen", f"127.0.0.1:{self.agent_port}",
                           *serve_args, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        assert wait_ready(self.agent_port, self.agent, 120)[0] == 200, log.read_text()
        self.app = subprocess.Popen(
            [sys.executable, str(SERVER), "--port", str(app_port)],
            env=cli_env({"TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}),
            stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def up(self) -> None:
        wait_for(f"http://127.0.0.1:{self.app_port}/healthz", self.app, 300, self.log)

    def stop(self) -> tuple[int, int]:
        for proc in (self.app, self.agent):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        return self.app.wait(timeout=120), self.agent.wait(timeout=120)


@pytest.mark.compile
def test_a_server_beside_serve_publish_warms_the_next_node(tmp_path, fleet):
    """Node 1's FastAPI app beside `serve --publish` becomes ready, compiles on its first
    request, and once no entry has appeared for quiet_s its cache is published while it
    runs; node 2's app answers its first request from the cache (hits, no miss)."""
    cache_dir = fleet["node"] / "inductor"
    port = free_port()
    path = config(tmp_path, fleet, ready_url=f"http://127.0.0.1:{port}/healthz", quiet_s=5)
    first = Pod(tmp_path / "node-1.log", path, cache_dir, port, "--publish")
    try:
        first.up()
        stats = predict(port)
        assert stats["counters"]["fxgraph_cache_miss"] >= 1, stats  # cold: it compiled
        deadline = time.monotonic() + 120
        while published(first.agent_port) < 1:
            assert time.monotonic() < deadline, first.log.read_text()
            time.sleep(0.5)
        assert first.app.poll() is None  # published while the app runs
    finally:
        codes = first.stop()
    log = first.log.read_text()
    assert codes == (0, 0), log
    assert log.count("publish: published app") == 1, log
    (m,) = manifests(fleet)
    assert m["publisher"] == "node", m

    fresh(fleet)
    second = Pod(tmp_path / "node-2.log", path, cache_dir, free_port())  # no --publish
    try:
        second.up()
        stats = predict(second.app_port)
    finally:
        second.stop()
    c = stats["counters"]
    assert c["fxgraph_cache_hit"] >= 1 and c["fxgraph_cache_miss"] == 0, stats
    assert "warm: app (cachedir" in second.log.read_text()
