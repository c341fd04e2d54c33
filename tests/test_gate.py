"""The node gate: the main process starts only after the cache is in place, and never waits
forever on a sick store. Agent and main process are separate processes that share only
the cache directory (and, for the sidecar, a loopback port)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import WORKLOAD, readyz, spawn, torchwarm
from factories import inject_env
from servers import FAKE_AWS_ENV, free_port

# The gates over a real seed compile (its session fixture); only the hung-store bounds are
# `timed` (run alone, after the parallel pass: see pyproject.toml).

N_SETS = len(WORKLOAD["inputs"])


def assert_warm(report: dict, cache_dir: Path) -> None:
    assert report["cache_dir"] == str(cache_dir)
    c = report["counters"]
    assert c["fxgraph_cache_hit"] == N_SETS and c["fxgraph_cache_miss"] == 0
    assert report["new_so_files"] == 0


# The "main process": waits on the gate, then compiles the workload itself (via probe).
MAIN = """
import json, subprocess, sys, time, urllib.error, urllib.request
url, config = sys.argv[1], sys.argv[2]
refused = 0
while True:
    try:
        urllib.request.urlopen(url, timeout=2)
        break
    except urllib.error.HTTPError:
        refused += 1
    except OSError:
        refused += 1
    time.sleep(0.1)
out = subprocess.run([sys.executable, "-m", "torchwarm.cli", "probe", "-c", config, "--json"],
                     capture_output=True, text=True, check=True).stdout
print(json.dumps({"refused": refused, "probe": json.loads(out.strip().splitlines()[-1])}))
"""


@pytest.mark.compile
def test_sidecar_holds_the_main_process_until_installed(node_factory):
    """Main waits on /readyz (503s first), then compiles from the installed cache and hits."""
    node = node_factory()
    port = free_port()
    url = f"http://127.0.0.1:{port}/readyz"
    main = subprocess.Popen([sys.executable, "-c", MAIN, url, str(node.config)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    agent = spawn("serve", "-c", str(node.config), "--listen", f"127.0.0.1:{port}",
                  stdout=subprocess.PIPE)  # fmt: skip
    try:
        out, _ = main.communicate(timeout=240)
        doc = json.loads(out.strip().splitlines()[-1])
        assert doc["refused"] > 0  # it really was held
        assert_warm(doc["probe"], node.cache_dir)
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    assert agent.returncode == 0  # SIGTERM stops the sidecar cleanly


@pytest.mark.compile
def test_marker_gate_with_a_one_shot_pull(node_factory):
    """`torchwarm wait` started before the pull returns only after it, and the probe hits."""
    node = node_factory()
    waiter = spawn("wait", "--marker", str(node.marker), "--timeout", "240",
                   stdout=subprocess.PIPE)  # fmt: skip
    time.sleep(1.0)
    assert waiter.poll() is None  # still waiting: no marker yet
    node.pull()
    assert waiter.wait(timeout=30) == 0
    assert_warm(node.probe(), node.cache_dir)


@pytest.mark.compile
def test_readyz_is_503_until_installed_then_200(node_factory):
    """/readyz answers 503 while nothing is installed, and 200 only once the tree is complete.
    The fetch takes 2 s longer (an injected slow store), so the 503 before the install is
    seen whatever the machine's load; a pull of this size is otherwise over in ~0.1 s."""
    node = node_factory()
    port = free_port()
    slow = inject_env("torchwarm.node.fetch:sources:slow")
    agent = spawn("serve", "-c", str(node.config), "--listen", f"127.0.0.1:{port}", env=slow,
                  stdout=subprocess.PIPE)  # fmt: skip
    seen = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            code, _ = readyz(port)
            if code == 200:
                assert (node.cache_dir / "fxgraph").is_dir() and node.marker.exists()
                break
            if code == 503:
                seen.append(node.cache_dir.exists())
            time.sleep(0.05)
        assert seen and not seen[0]  # 503 observed while the cache dir did not exist
        assert [readyz(port)[0] for _ in range(5)] == [200] * 5  # and it stays ready
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert "torchwarm_ready 1" in metrics
        assert 'torchwarm_workload_warm{workload="mlp"} 1' in metrics
    finally:
        agent.terminate()
        agent.wait(timeout=30)


@pytest.mark.compile
def test_exec_form_hands_over_the_process(node_factory):
    """`torchwarm run -- CMD` pulls, then CMD runs as the same PID with the cache env set."""
    node = node_factory()
    show = "import json, os; print(json.dumps({'pid': os.getpid(), 'env': dict(os.environ)}))"
    proc = spawn("run", "-c", str(node.config), "--", sys.executable, "-c", show,
                 env={"TRITON_CACHE_DIR": "/elsewhere"}, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE)  # fmt: skip
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["pid"] == proc.pid
    assert doc["env"]["TORCHINDUCTOR_CACHE_DIR"] == str(node.cache_dir)
    assert "TRITON_CACHE_DIR" not in doc["env"]
    assert "warm: mlp" in err
    assert (node.cache_dir / "fxgraph").is_dir()


def s3_config(tmp_path: Path, port: int, deadline_s: float) -> Path:
    doc = {
        "store": "s3://torchwarm-test/down",
        "store_options": {
            "endpoint_url": f"http://127.0.0.1:{port}",
            "path_style": True,
            "region": "us-east-1",
            "attempts": 1,
        },  # fmt: skip
        "cache_dir": str(tmp_path / "cache" / "inductor"),
        "deadline_s": deadline_s,
        "workloads": [WORKLOAD],
    }
    path = tmp_path / "down.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


DEADLINE = 5.0


@pytest.mark.timed
def test_hung_store_fail_open_starts_cold_within_the_deadline(tmp_path, black_hole):
    """A store that never answers: the pull gives up at its deadline and starts cold."""
    cfg = s3_config(tmp_path, black_hole, DEADLINE)
    t0 = time.monotonic()
    out = torchwarm("pull", "-c", str(cfg), env=FAKE_AWS_ENV)
    assert time.monotonic() - t0 < DEADLINE + 2  # the hard bound
    assert "starting cold" in out.stdout and "deadline" in out.stdout
    assert not (tmp_path / "cache" / "inductor").exists()
    assert json.loads((tmp_path / "cache" / "torchwarm-ready.json").read_text())["timed_out"]


@pytest.mark.timed
def test_hung_store_fail_closed_exits_9_with_one_line(tmp_path, black_hole):
    """With --require, the same hang exits 9 at the deadline with one line and no marker."""
    cfg = s3_config(tmp_path, black_hole, DEADLINE)
    t0 = time.monotonic()
    out = torchwarm("pull", "-c", str(cfg), "--require", env=FAKE_AWS_ENV, check=False)
    assert time.monotonic() - t0 < DEADLINE + 2  # the hard bound
    assert out.returncode == 9
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "deadline" in lines[0]
    assert not (tmp_path / "cache" / "torchwarm-ready.json").exists()


def test_refused_store_fail_closed_exits_3_with_one_line(tmp_path):
    """A store that refuses connections: --require exits 3 with one line naming the endpoint."""
    port = free_port()  # nothing listens there
    cfg = s3_config(tmp_path, port, DEADLINE)
    out = torchwarm("pull", "-c", str(cfg), "--require", env=FAKE_AWS_ENV, check=False)
    assert out.returncode == 3
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0]
