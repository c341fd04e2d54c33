"""Shared fixtures. Object-store servers (and `free_port`) live in servers.py; the compile
seed is here, with the one way to run the CLI in a new process (`torchwarm` waits for it,
`spawn` starts a long-running one) and the one poller of the agent's /readyz.

The seed compiles once per test session (CPU compiles are slow) and keeps its captures
on disk; every test that needs a store pushes those captures into a store of its own.
Claims about what a new node sees are checked in fresh subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.register_assert_rewrite("servers")  # imported here before pytest loads it as a plugin
from servers import AWS_ENV_TO_HIDE  # noqa: E402

pytest_plugins = ("servers",)

# pytest deletes the temp folders of older runs with shutil.rmtree, which recurses once per
# folder level before Python 3.13: a 1,000-deep tree that a failing hostile-input test left
# behind would crash every later session at exit (RecursionError, exit 1) although every
# test passed. The hostile tests remove their deep trees themselves; this is the backstop.
sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

# An xdist worker (`make test` runs two) starts with its cwd put first on PYTHONPATH; the
# processes the tests start (seeds, nodes, apps) get the environment a plain run gives.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _first, _, _rest = os.environ.get("PYTHONPATH", "").partition(os.pathsep)
    if _first == os.getcwd():
        if _rest:
            os.environ["PYTHONPATH"] = _rest
        else:
            del os.environ["PYTHONPATH"]

# Every process the tests start inherits this mark (it is no TORCHWARM_* variable, which a
# warm-up child loses), so that this test process can find what it left running at its end:
# pytest_unconfigure. One mark per process: an xdist worker never takes the other's.
RUN_MARK = "TW_TEST_RUN"
os.environ[RUN_MARK] = f"{os.getpid()}-{time.time_ns()}"

WORKLOAD = {
    "name": "mlp",
    "model": "torchwarm.models:mlp",
    "model_kwargs": {"d_in": 32, "hidden": 64, "d_out": 32},
    "inputs": [
        [{"shape": [4, 32], "dtype": "float32", "dynamic": [0]}],
        [{"shape": [1, 32], "dtype": "float32"}],
    ],
}


CLI = (sys.executable, "-m", "torchwarm.cli")  # the command line, as `torchwarm` runs it


def cli_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus `env`, less anything that could point boto3 at a
    real account or endpoint (unless `env` sets it)."""
    inherited = {k: v for k, v in os.environ.items() if k not in AWS_ENV_TO_HIDE}
    return {**inherited, **(env or {})}


def torchwarm(
    *args: str, env: Mapping[str, str] | None = None, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a new process, as a node or a seed would, and wait for it."""
    proc = subprocess.run(
        [*CLI, *args], env=cli_env(env), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchwarm {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def spawn(*args: str, env: Mapping[str, str] | None = None, **popen: Any) -> subprocess.Popen[str]:
    """Start the CLI in a new process and return at once (serve, daemon, run, wait);
    `popen` goes to Popen (stdout=subprocess.PIPE, ...)."""
    return subprocess.Popen([*CLI, *args], env=cli_env(env), text=True, **popen)


def readyz(port: int) -> tuple[int, str]:
    """GET /readyz of the agent on 127.0.0.1:`port`: (status, body), (0, "") until it listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def wait_ready(port: int, proc: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    """Poll /readyz until it says 200, `proc` exits or `timeout` s pass; the last answer."""
    deadline = time.monotonic() + timeout
    answer = readyz(port)
    while answer[0] != 200 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        answer = readyz(port)
    return answer


def write_config(path: Path, store: str, cache_dir: Path, fmt: str = "cachedir") -> Path:
    doc = {"store": store, "cache_dir": str(cache_dir), "format": fmt, "workloads": [WORKLOAD]}
    path.write_text(yaml.safe_dump(doc))
    return path


@dataclass
class Seed:
    root: Path
    cold: dict[str, dict]  # format -> warm-up summary (counters, first-call seconds)

    def out(self, fmt: str) -> Path:
        return self.root / fmt


ISA_OK = "TORCHINDUCTOR_VEC_ISA_OK"


@pytest.fixture(scope="module")
def trust_the_vector_isa() -> Iterator[None]:
    """For a module whose compiles are not about torch's vector-ISA check (use it with
    `pytestmark = pytest.mark.usefixtures("trust_the_vector_isa")`): its processes get
    TORCHINDUCTOR_VEC_ISA_OK=1, so torch trusts the ISA it picked instead of building and
    loading a test library in every fresh cache dir, about 6 of a cold compile's 13 CPU-s
    here (examples/compile_mlp.py: 7.2 against 12.6 s user). Seeds and nodes of the module
    inherit it alike, so it is in both fingerprints and their caches match; their
    captures hold no ISA-check libraries. Never for a module that uses the session seed
    (which the seed fixture refuses): the other modules' nodes would not match it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ISA_OK, "1")
        yield


def _warm_up_seed(root: Path) -> dict[str, dict]:
    """The seed's warm-ups into `root`, one per capture format, at once: each is a cold
    compile in a cache dir of its own, mostly one core's work. Their summaries by format."""
    if os.environ.get(ISA_OK):
        raise pytest.UsageError(f"the session seed warms up with ${ISA_OK} set (a module "
                                "using trust_the_vector_isa asked for it): no node of another "
                                "module would match its fingerprint")  # fmt: skip
    runs = {}
    for fmt in ("cachedir", "megacache"):
        cfg = write_config(root / f"{fmt}.yaml", (root / "unused").as_uri(), root / f"c-{fmt}", fmt)
        runs[fmt] = spawn("warmup", "-c", str(cfg), "--out", str(root / fmt),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    cold = {}
    for fmt, proc in runs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"the seed's {fmt} warm-up exited {proc.returncode}\n{out}"
        cold[fmt] = json.loads((root / fmt / "mlp" / "warmup.json").read_text())["summary"]
    return cold


@pytest.fixture(scope="session")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Seed:
    """One warm-up per capture format, kept on disk for every test to push (none writes
    there). Under xdist the workers share it, in their run's common temp folder: the first
    to need it warms up under a lock and the others wait (a seed per worker was twice the
    cold compiles on the same two cores)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.mktemp("seed")
        return Seed(root, _warm_up_seed(root))
    import fcntl

    shared = tmp_path_factory.getbasetemp().parent  # the run's, above each worker's own
    root, done = shared / "seed", shared / "seed.json"
    with open(shared / "seed.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # let go when the file closes or its worker dies
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # half a seed, from a worker that died
            root.mkdir()
            (shared / "seed.json.tmp").write_text(json.dumps(_warm_up_seed(root)))
            (shared / "seed.json.tmp").rename(done)  # whole or absent for the next worker
        return Seed(root, json.loads(done.read_text()))


@dataclass
class Node:
    """A store with the seed pushed into it, and an empty cache dir for a new node."""

    config: Path
    store: Path
    cache_dir: Path
    marker: Path

    def pull(self, *extra: str, env: dict[str, str] | None = None, check: bool = True):
        return torchwarm("pull", "-c", str(self.config), *extra, env=env, check=check)

    def probe(self, env: dict[str, str] | None = None) -> dict:
        proc = torchwarm("probe", "-c", str(self.config), "--json", env=env)
        return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def node_factory(seed: Seed, tmp_path: Path) -> Callable[..., Node]:
    """Make a store holding the seed's capture (pushed in a subprocess) and a node config."""

    def make(fmt: str = "cachedir", push: bool = True, name: str = "node") -> Node:
        base = tmp_path / name
        store = base / "store"
        base.mkdir(parents=True, exist_ok=True)
        cfg = write_config(base / "config.yaml", store.as_uri(), base / "cache" / "inductor", fmt)
        if push:
            torchwarm("push", "-c", str(cfg), "--from", str(seed.out(fmt)))
        return Node(
            cfg, store, base / "cache" / "inductor", base / "cache" / "torchwarm-ready.json"
        )

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `make test`'s two xdist workers (`-n 2 --dist loadfile --no-loadscope-reorder`,
    each file on one worker, so that module fixtures run once), the files with most
    compiling tests go first, then those with most tests, so that neither worker is left
    alone with a long file at the end. A run without workers keeps its order.

    No test may be both `timed` and `compile`: `make test` runs the timed tests two at a
    time after the parallel pass, which is fair only while none of them compiles."""
    both = [
        i.nodeid for i in items if i.get_closest_marker("timed") and i.get_closest_marker("compile")
    ]
    if both:
        raise pytest.UsageError(
            f"{len(both)} test(s) marked both timed and compile ({', '.join(both[:3])}): a "
            "timed test runs beside another timed test, where nothing may compile; move "
            "the compile into another test or drop the wall-clock bound"
        )
    if not hasattr(config, "workerinput"):  # set in xdist's workers only
        return
    compiling = Counter(item.path for item in items if item.get_closest_marker("compile"))
    tests = Counter(item.path for item in items)
    # Stable: a file's own order is kept.
    items.sort(key=lambda item: (-compiling[item.path], -tests[item.path]))


def pytest_unconfigure(config: pytest.Config) -> None:
    """Kill what this test process's tests started and left running: a pull's worker stuck
    in an injected `c-sleep` (an hour in C) is abandoned at its deadline by design, and a
    test that failed half-way may leave an app or a server behind. Found by RUN_MARK in
    /proc/PID/environ, the environment each was started with."""
    import signal

    mark = f"{RUN_MARK}={os.environ[RUN_MARK]}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                started_here = mark in f.read().split(b"\0")
            if started_here:
                os.kill(int(name), signal.SIGKILL)
        except OSError:  # gone already, or not ours to read
            continue
