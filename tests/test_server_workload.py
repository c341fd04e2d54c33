"""Server workloads (a command with a `server:` block): torchwarm starts the server, waits
until it is ready, sends its warm-up requests, stops it, then captures; each way it can
go wrong is exit 7 with one line and nothing published.

The server is tests/server_fake.py (stdlib, no torch), driven through the CLI in a new
process. The end-to-end compile with the real FastAPI example is the last test.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import spawn, torchwarm
from factories import alive
from servers import free_port

from torchwarm import config
from torchwarm.seed import processes
from torchwarm.seed import server as server_mod
from torchwarm.seed.warmup import warmup_key

pytestmark = pytest.mark.usefixtures("trust_the_vector_isa")

FAKE = Path(__file__).with_name("server_fake.py")
REPO = Path(__file__).resolve().parent.parent
PREDICT = {"method": "POST", "path": "/predict", "json": {"input_ids": [[1, 2, 3]]}, "repeat": 2}


def fake(name: str, port: int, *args: str, **server: Any) -> dict[str, Any]:
    """A workload running server_fake.py on `port` with `args`; `server` overrides its
    server block (default: ready on GET /healthz, two POST /predict and one GET /info)."""
    block = {
        "port": port,
        "ready": {"http": "/healthz"},
        "ready_timeout_s": 20,
        "requests": [PREDICT, {"path": "/info"}],
        "stop": {"grace_s": 5},
        **server,
    }
    return {"name": name, "command": [sys.executable, str(FAKE), "--port", str(port), *args],
            "code": [str(FAKE)], "warmup_timeout_s": 30, "server": block}  # fmt: skip


def setup(folder: Path, workload: dict[str, Any]) -> Path:
    """A config in `folder`: local store `store/`, cache_dir `node/inductor`."""
    doc = {"store": "store", "cache_dir": "node/inductor", "workloads": [workload]}
    path = folder / "torchwarm.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def warmup(folder: Path, workload: dict[str, Any], *extra: str, timeout: float = 120):
    path = setup(folder, workload)
    return torchwarm("warmup", "-c", str(path), "--out", str(folder / "out"), *extra,
                     check=False, timeout=timeout)  # fmt: skip


def recorded(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def manifests(folder: Path) -> list[Path]:
    return sorted((folder / "store").rglob("manifests/**/*.json"))


def one_error(proc) -> str:
    """The one line a failed warm-up printed, checked to be exit 7."""
    assert proc.returncode == 7, (proc.returncode, proc.stdout, proc.stderr)
    (line,) = proc.stderr.splitlines()
    return line


# -- a server that becomes ready ----------------------------------------------------------


@pytest.mark.parametrize(
    ("ready", "args", "stop"),
    [
        ({"http": "/healthz"}, ["--healthy-after", "1"], {"signal": "SIGTERM", "grace_s": 5}),
        ({"tcp": True}, ["--listen-after", "1"], {"signal": "SIGTERM", "grace_s": 5}),
        ({"log": "ready to (serve|go)"}, ["--healthy-after", "1", "--on-stop", "0"],
         {"signal": "SIGINT", "grace_s": 5}),
    ],
    ids=["http", "tcp", "log"],
)  # fmt: skip
def test_ready_server_gets_its_requests_is_stopped_and_captured(tmp_path, ready, args, stop):
    """Once its check passes (not before: it answers 503 until healthy), the server gets
    each request in order, then the stop signal; it is gone, the cache it wrote is
    published and the manifest says when it was ready and how each request answered."""
    port, rec = free_port(), tmp_path / "record.jsonl"
    w = fake("api", port, *args, "--record", str(rec), "--cache", ready=ready, stop=stop)
    proc = warmup(tmp_path, w, "--push")
    assert proc.returncode == 0, proc.stderr
    pid, *asked = recorded(rec)
    assert asked == [
        {"method": "POST", "path": "/predict", "json": {"input_ids": [[1, 2, 3]]}, "status": 200},
        {"method": "POST", "path": "/predict", "json": {"input_ids": [[1, 2, 3]]}, "status": 200},
        {"method": "GET", "path": "/info", "json": None, "status": 200},
        {"signal": stop["signal"]},
    ]
    assert not alive(pid["pid"])
    assert (tmp_path / "out" / "api" / "cache" / "fake" / "request-3.json").is_file()
    (path,) = manifests(tmp_path)
    summary = json.loads(path.read_text())["warmup"]
    served = summary["server"]
    assert served["ready_s"] >= 0.9 and summary["wall_s"] >= served["ready_s"]
    assert [(r["method"], r["path"], r["status"]) for r in served["requests"]] == [
        ("POST", "/predict", 200), ("POST", "/predict", 200), ("GET", "/info", 200)]  # fmt: skip
    assert all(r["latency_s"] >= 0 for r in served["requests"])
    assert served["stopped"].startswith(f"on {stop['signal']}: "), served["stopped"]
    assert "warmed api: server ready in " in proc.stdout


# -- failures: exit 7, one line, nothing published ----------------------------------------


@pytest.mark.timed
def test_never_ready_exits_7_within_its_ready_timeout(tmp_path):
    """A server whose /healthz never answers 2xx: exit 7 soon after ready_timeout_s, one
    line with the check and what it last saw, the last log lines and the log; it and its
    children are killed and nothing is published."""
    port, rec = free_port(), tmp_path / "record.jsonl"
    w = fake("api", port, "--healthy-after", "inf", "--record", str(rec), ready_timeout_s=2)
    t0 = time.monotonic()
    line = one_error(warmup(tmp_path, w, "--push"))
    assert time.monotonic() - t0 < 2 + 8
    log = tmp_path / "out" / "api" / "warmup.log"
    assert line.startswith(f"torchwarm: error: warm-up of 'api' (server {sys.executable} ")
    assert (f": not ready within 2 s (ready: GET http://127.0.0.1:{port}/healthz, last: "
            "status 503); killed it and its child processes; last lines: ") in line  # fmt: skip
    assert '"GET /healthz HTTP/1.1" 503' in line and line.endswith(f"; full log: {log}")
    assert not alive(recorded(rec)[0]["pid"])
    assert manifests(tmp_path) == [] and len(recorded(rec)) == 1  # no request was sent


@pytest.mark.timed
def test_a_dripping_health_check_is_bounded_by_ready_timeout(tmp_path):
    """A /healthz that answers 200 but sends its body one byte a second never passes nor
    holds the check past ready_timeout_s: exit 7 soon after it, last: no answer in time."""
    port = free_port()
    w = fake("api", port, "--drip-healthz", ready_timeout_s=2)
    t0 = time.monotonic()
    line = one_error(warmup(tmp_path, w, timeout=30))
    assert time.monotonic() - t0 < 2 + 8
    assert (f": not ready within 2 s (ready: GET http://127.0.0.1:{port}/healthz, last: "
            "no answer in time); killed it") in line  # fmt: skip


def test_wrong_status_exits_7_naming_the_request(tmp_path):
    """A warm-up request answered with another status than configured: exit 7 naming the
    request, its number and both statuses; nothing published, no later request sent."""
    port, rec = free_port(), tmp_path / "record.jsonl"
    w = fake("api", port, "--status", "500", "--record", str(rec))
    line = one_error(warmup(tmp_path, w, "--push"))
    assert (f"warm-up of 'api' (server {sys.executable} {FAKE} --port {port} --status 500 "
            f"--record {rec}): POST http://127.0.0.1:{port}/predict (request 1 of 3) "
            'answered 500, expected 200 (answer: {"ok": false}); killed it and its child '
            "processes") in line  # fmt: skip
    assert manifests(tmp_path) == [] and len(recorded(rec)) == 2


@pytest.mark.timed
def test_request_past_its_timeout_exits_7_in_time(tmp_path):
    """A warm-up request that gets no answer within request_timeout_s: exit 7 soon after,
    naming the request and the timeout; the server is killed."""
    port, rec = free_port(), tmp_path / "record.jsonl"
    w = fake("api", port, "--answer-after", "60", "--record", str(rec), request_timeout_s=2)
    t0 = time.monotonic()
    line = one_error(warmup(tmp_path, w))
    assert time.monotonic() - t0 < 2 + 8
    assert (f": POST http://127.0.0.1:{port}/predict (request 1 of 3) got no answer within "
            "2 s (request_timeout_s); killed it and its child processes; ") in line  # fmt: skip
    assert not alive(recorded(rec)[0]["pid"])


def test_crash_before_ready_exits_7_with_its_exit_status_and_last_lines(tmp_path):
    """A server that exits before it is ready: exit 7 at once, with its exit status and
    its last output lines joined on one line."""
    port = free_port()
    t0 = time.monotonic()
    line = one_error(warmup(tmp_path, fake("api", port, "--exit-before-ready", "3"), "--push"))
    assert time.monotonic() - t0 < 20  # not its ready_timeout_s
    assert (f": exited (exit 3) before it was ready (ready: GET http://127.0.0.1:{port}"
            "/healthz, last: connection refused); last lines: loading weights | "
            "RuntimeError: out of memory; full log: ") in line  # fmt: skip
    assert manifests(tmp_path) == []


def test_crash_on_a_request_exits_7_naming_the_request_and_its_exit(tmp_path):
    """A server that dies on its first warm-up request: exit 7 naming that request, that
    it got no answer, and the server's exit status."""
    port = free_port()
    line = one_error(warmup(tmp_path, fake("api", port, "--crash-on-request"), "--push"))
    assert f"POST http://127.0.0.1:{port}/predict (request 1 of 3) got no answer (" in line
    assert "); the server exited (exit 5); " in line
    assert "last lines: " in line and "Segmentation fault in the model" in line
    assert manifests(tmp_path) == []


def test_bad_exit_on_the_stop_signal_fails(tmp_path):
    """A server that exits 1 on SIGTERM crashed on the way down: exit 7, nothing published."""
    port = free_port()
    line = one_error(warmup(tmp_path, fake("api", port, "--on-stop", "1"), "--push"))
    assert ": exited (exit 1) on SIGTERM (0, or death by SIGTERM, expected); " in line
    assert manifests(tmp_path) == []


def test_server_ignoring_sigterm_is_killed_after_grace_with_its_grandchild(tmp_path):
    """A server that ignores SIGTERM is SIGKILLed with its whole process group once
    stop.grace_s has passed; the warm-up (its requests done) is captured."""
    port, pids = free_port(), tmp_path / "pids.json"
    w = fake("api", port, "--ignore-term", "--pids", str(pids), stop={"grace_s": 1})
    t0 = time.monotonic()
    proc = warmup(tmp_path, w)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 >= 1
    started = json.loads(pids.read_text())
    assert not alive(started["child"]) and not alive(started["grandchild"]), started
    summary = json.loads((tmp_path / "out" / "api" / "warmup.json").read_text())["summary"]
    assert summary["server"]["stopped"] == "on SIGTERM: no exit within 1 s, killed (SIGKILL)"


def test_the_rest_of_the_group_gets_the_grace_after_the_server_exits(tmp_path):
    """A server that exits at once on SIGTERM while a worker of its group still flushes:
    the worker gets what is left of stop.grace_s (it is not SIGKILLed with the server's
    exit), its file is written and the stop is clean."""
    port, flushed = free_port(), tmp_path / "flushed"
    proc = warmup(tmp_path, fake("api", port, "--linger", str(flushed)))
    assert proc.returncode == 0, proc.stderr
    assert flushed.read_text() == "flushed\n"
    summary = json.loads((tmp_path / "out" / "api" / "warmup.json").read_text())["summary"]
    assert summary["server"]["stopped"] == "on SIGTERM: killed by SIGTERM"


def test_a_worker_outliving_the_grace_is_killed_and_the_manifest_says_so(tmp_path):
    """A worker of the server's group still running when stop.grace_s is over is SIGKILLed,
    and `stopped` says so rather than clean."""
    port, flushed = free_port(), tmp_path / "flushed"
    w = fake("api", port, "--linger", str(flushed), stop={"grace_s": 0.5})
    proc = warmup(tmp_path, w)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "api" / "warmup.json").read_text())["summary"]
    assert summary["server"]["stopped"] == (
        "on SIGTERM: killed by SIGTERM; its process group was not gone within 0.5 s, "
        "killed (SIGKILL)"
    )
    time.sleep(1.5)
    assert not flushed.exists()


def test_stop_leaves_a_server_that_just_exited_unreaped(tmp_path):
    """A server that exits 1 just as the stop comes (after the exit check) is not reaped by
    the stop: its pid stays the group's until the group is killed, and the bad exit fails."""
    server = config.Server(port=1, ready="tcp", ready_target="", ready_timeout_s=5.0,
                           requests=(), request_timeout_s=5.0, stop_signal="SIGTERM",
                           stop_grace_s=5.0)  # fmt: skip
    argv = [sys.executable, "-c", "raise SystemExit(1)"]
    with processes.started("'api'", argv, {}, tmp_path / "log") as proc:
        assert processes.wait_unreaped(proc, 10) == "exited"
        real, checks = processes.exited, []

        def exited(p: subprocess.Popen[bytes]) -> bool:
            checks.append(p)  # the first check runs just before it exits
            return len(checks) > 1 and real(p)

        with pytest.MonkeyPatch.context() as m:
            m.setattr(processes, "exited", exited)
            with pytest.raises(server_mod._Failed, match=r"exited \(exit 1\)"):
                server_mod._stop(proc, server)
        assert proc.returncode is None  # unreaped: started() reaps it after the kill


def test_a_deadline_passed_before_a_request_says_so(tmp_path):
    """A warm-up whose time ran out between two requests says that, with its seconds
    written plainly (1800, not 1.8e+03), not a negative wait."""
    with socket.create_server(("127.0.0.1", 0)) as mute:  # accepts, never answers
        port = mute.getsockname()[1]
        server = config.Server(port=port, ready="tcp", ready_target="", ready_timeout_s=5.0,
                               requests=(config.WarmRequest("GET", "/info", None, 1, 200),),
                               request_timeout_s=5.0, stop_signal="SIGTERM",
                               stop_grace_s=5.0)  # fmt: skip
        with pytest.raises(server_mod._Failed) as e:
            server_mod._send(None, server, time.monotonic() - 0.04, 1800.0, None)
    assert e.value.problem == (
        "the warm-up's time (warmup_timeout_s 1800 s) ran out before request 1 of 1 "
        f"(GET http://127.0.0.1:{port}/info)"
    )
    assert [server_mod.seconds(x) for x in (1800.0, 2.0, 0.5, 0.04)] == ["1800", "2", "0.5",
                                                                        "0.04"]  # fmt: skip


def test_port_already_taken_is_refused_before_starting(tmp_path):
    """Another process listening on server.port would get the warm-up's requests: exit 7
    before the server is started."""
    rec = tmp_path / "record.jsonl"
    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        line = one_error(warmup(tmp_path, fake("api", port, "--record", str(rec))))
    assert (f": 127.0.0.1:{port} accepts connections before the server started: another "
            "process listens there and would get the warm-up's requests; stop it or set "
            "server.port to a free port") in line  # fmt: skip
    assert not rec.exists()


def test_warmup_key_follows_the_requests_not_the_timeouts(tmp_path):
    """The daemon re-warms a server whose requests, ready check or port changed; not one
    whose timeouts or stop grace did (they change nothing compiled)."""
    w = fake("api", 8123)
    (tmp_path / "a").mkdir()

    def key(**server: Any) -> str:
        path = setup(tmp_path / "a", {**w, "server": {**w["server"], **server}})
        (loaded,) = config.load(path, environ={}).workloads
        return warmup_key(loaded, "cachedir", "0" * 32)

    first = key()
    assert key(ready_timeout_s=5, request_timeout_s=7, stop={"grace_s": 1}) == first
    assert key(requests=[PREDICT]) != first
    assert key(ready={"tcp": True}) != first
    assert key(port=8124) != first


# -- probe --------------------------------------------------------------------------------


def test_probe_drives_the_server_against_the_cache_dir(tmp_path):
    """probe runs the server workload as its warm-up does (ready, requests, stop) with the
    node's cache dir, and says when it was ready and what each request answered."""
    port, rec = free_port(), tmp_path / "record.jsonl"
    path = setup(tmp_path, fake("api", port, "--record", str(rec), "--cache"))
    node = tmp_path / "node" / "inductor"
    proc = torchwarm("probe", "-c", str(path), "--cache-dir", str(node), "--json", timeout=120)
    doc = json.loads(proc.stdout)
    assert [r["status"] for r in doc["server"]["requests"]] == [200, 200, 200]
    assert (node / "fake" / "request-3.json").is_file()
    assert [r.get("path") for r in recorded(rec)[1:]] == ["/predict", "/predict", "/info", None]


# -- the shipped example, end to end ------------------------------------------------------


def test_example_server_config_loads():
    """configs/example-server.yaml is a server workload on the FastAPI example."""
    cfg = config.load(REPO / "configs" / "example-server.yaml", environ={})
    (w,) = cfg.workloads
    assert w.command is not None and w.command.server is not None
    assert w.command.server.ready == "http" and w.command.server.requests
    assert (w.command.cwd / w.command.argv[1]).is_file()


@pytest.mark.compile
def test_example_server_seeds_a_node_whose_app_hits_on_its_first_request(tmp_path):
    """configs/example-server.yaml, end to end: the seed starts the FastAPI example,
    which compiles on its warm-up requests, and publishes; on a fresh node the same app
    under `torchwarm run` answers its first /predict from the cache (FX-graph hits, no
    miss, by its own /stats)."""
    doc = yaml.safe_load((REPO / "configs" / "example-server.yaml").read_text())
    node = tmp_path / "node" / "inductor"
    doc.update(store=str(tmp_path / "store"), cache_dir=str(node))
    (w,) = doc["workloads"]
    port = free_port()
    w["command"] = [sys.executable, str(REPO / "examples" / "server_app.py"), "--port", str(port)]
    w["code"] = [str(REPO / "examples" / "server_app.py")]
    w["server"]["port"] = port
    path = tmp_path / "example-server.yaml"
    path.write_text(yaml.safe_dump(doc))
    torchwarm("warmup", "-c", str(path), "--push", timeout=900)
    (manifest,) = manifests(tmp_path)
    seeded = json.loads(manifest.read_text())["warmup"]
    assert seeded["counters"]["fxgraph_cache_miss"] >= 1, seeded  # the seed compiled
    assert [r["status"] for r in seeded["server"]["requests"]] == [200, 200, 200]
    assert not node.exists() or not any(node.iterdir())  # the seed left no cache there

    port = free_port()
    with (tmp_path / "app.log").open("w") as log:
        app = spawn("run", "-c", str(path), "--", sys.executable,
                    str(REPO / "examples" / "server_app.py"), "--port", str(port),
                    stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                    break
            except OSError:
                assert app.poll() is None and time.monotonic() < deadline, (
                    (tmp_path / "app.log").read_text())  # fmt: skip
                time.sleep(0.2)
        body = json.dumps({"input_ids": [[1, 2, 3, 4]]}).encode()
        ask = urllib.request.Request(f"{url}/predict", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(ask, timeout=300) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"{url}/stats", timeout=10) as r:
            stats = json.load(r)
    finally:
        app.terminate()
        app.wait(timeout=60)
    c = stats["counters"]
    assert c["fxgraph_cache_hit"] >= 1 and c["fxgraph_cache_miss"] == 0, stats
