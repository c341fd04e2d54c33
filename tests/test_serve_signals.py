"""`serve` and SIGTERM during the pull: a pod deleted while it starts up stops its sidecar
at once (the worker killed, exit 0), not at the pull's deadline, and leaves the cache
volume as the next pull would find it after any stopped worker."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import WORKLOAD, spawn
from servers import FAKE_AWS_ENV, free_port

from torchwarm.node.install import workdir

pytestmark = pytest.mark.timed  # a bound on how soon serve stops; see pyproject.toml

DEADLINE_S = 30  # the pull's deadline: what serve must not wait for
PROMPT_S = 8.0  # what "at once" allows here, the worker's reaping and a loaded machine included


def healthz(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def hung_node(tmp_path: Path, port: int) -> tuple[Path, Path]:
    """A config whose store is an S3 endpoint on `port` that never answers; its cache dir."""
    cache_dir = tmp_path / "volume" / "inductor"
    doc = {
        "store": "s3://torchwarm-test-bucket/hung",
        "store_options": {"endpoint_url": f"http://127.0.0.1:{port}", "path_style": True,
                          "region": "us-east-1", "attempts": 1, "read_timeout_s": 120},
        "cache_dir": str(cache_dir),
        "deadline_s": DEADLINE_S,
        "workloads": [WORKLOAD],
    }  # fmt: skip
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, cache_dir


def in_pull(pid: int) -> bool:
    """Whether `serve` (pid) has forked its pull worker (the hung store holds it there)."""
    try:
        return bool(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except OSError:
        return False


def leftovers(cache_dir: Path) -> list[str]:
    work = workdir(cache_dir)
    return sorted(p.name for p in work.glob("*") if p.name.startswith(("downloads-", "staging-")))


@pytest.mark.parametrize("require", [False, True], ids=["fail-open", "require"])
def test_sigterm_during_the_pull_exits_at_once(tmp_path, black_hole, require):
    """SIGTERM while the pull waits on a hung store: exit 0 within seconds of a 30 s
    deadline, no ready marker, and nothing of the stopped worker left in the workdir."""
    config, cache_dir = hung_node(tmp_path, black_hole)
    port = free_port()
    args = ["serve", "-c", str(config), "--listen", f"127.0.0.1:{port}"]
    proc = spawn(*args, *(["--require"] if require else []), env=FAKE_AWS_ENV,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        until = time.monotonic() + 20
        while not (healthz(port) and in_pull(proc.pid)) and time.monotonic() < until:
            time.sleep(0.05)  # serving, and the worker is inside its pull
        time.sleep(0.5)  # into its resolve, where the store never answers
        assert proc.poll() is None and in_pull(proc.pid), "the pull never started"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=PROMPT_S)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, (out, err)
    assert took < PROMPT_S
    assert "stopped by SIGTERM" in out, out
    assert not (cache_dir.parent / "torchwarm-ready.json").exists()
    until = time.monotonic() + 5  # removed by a detached process: the exit does not wait
    while leftovers(cache_dir) and time.monotonic() < until:
        time.sleep(0.05)
    assert not leftovers(cache_dir)
