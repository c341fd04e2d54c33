"""An app that dies with precompiled entries starts without them next time in that boot:
`torchwarm run` and `torchwarm.activate()` keep a per-boot record beside the ready marker.

No compiling: the store holds a hand-made precompile capture whose fields match the
node's workload and a tiny model package (so every pull installs the entries), and the
"app" is a few lines of Python that look at TORCH_CACHING_PRECOMPILE and then exit, raise
or die as a real app that torch's entries broke would. Every start is a fresh process.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CLI, cli_env, spawn, torchwarm
from factories import make_tree
from synthetic import node_fingerprint, publish_synthetic
from test_codeid import write_pkg

from torchwarm import config as cfgmod
from torchwarm.env import codeid
from torchwarm.formats import Captured
from torchwarm.node import precompile_rules as precompile
from torchwarm.seed.publish import build_manifest, publish
from torchwarm.spec import archive
from torchwarm.stores.local import LocalStore

WORKLOAD = {"name": "tiny", "model": "idpkg.model:build", "inputs": [[{"shape": [4, 16]}]]}
# The app: says whether precompile is on; if it is, exits with argv[1] or SIGKILLs itself
# ("kill"), as an app whose start torch's entries broke; if not, exits 0.
APP = """
import os, sys
flag = os.environ.get("TORCH_CACHING_PRECOMPILE")
print("flag=" + str(flag), flush=True)
if flag and sys.argv[1] == "kill":
    os.kill(os.getpid(), 9)
sys.exit(int(sys.argv[1]) if flag else 0)
"""


def node(tmp_path: Path, fmt: str = "precompile", key: str = "a" * 64) -> Path:
    """A store holding a capture for workload `tiny` (`fmt` precompile: one whose entries
    this node installs), the model package, and the node's config; returns the config."""
    app = write_pkg(tmp_path / "app")
    store = LocalStore(tmp_path / "store")
    cfg = tmp_path / "node.yaml"
    doc = {"store": store.url, "cache_dir": str(tmp_path / "volume" / "inductor"),
           "workloads": [WORKLOAD]}  # fmt: skip
    cfg.write_text(yaml.safe_dump(doc))
    publish_capture(store, tmp_path / f"capture-{key[:4]}", cfg, app, fmt, key)
    return cfg


def publish_capture(store: LocalStore, work: Path, cfg: Path, app: Path, fmt: str,
                    key: str) -> None:  # fmt: skip
    """Publish a `cachedir` capture, or a `precompile` one with entry `key` for `app`."""
    if fmt != "precompile":
        publish_synthetic(store, work, {"fxgraph/ab/f": b"graph"}, workload="tiny")
        return
    w = cfgmod.load(cfg).workloads[0]
    make_tree(work / "tree", {"fxgraph/ab/f": b"graph", f"dynamo/{key}/entry": b"entry"})
    caps = []
    for role, member in (("cachedir", "fxgraph/ab/f"), ("dynamo", f"dynamo/{key}/entry")):
        archive.write(work / "tree", [member], work / f"{role}.tar.zst")
        caps.append(Captured(role, work / f"{role}.tar.zst", archive.MEDIA_TYPE))
    meta = {
        "scheme": precompile.SCHEME,
        "code_identity": codeid.code_identity(w.model, [str(app)]).to_dict(),
        "workload_sha256": codeid.workload_identity(w),
        "dynamo_keys": [key],
        "entries": "kept",  # as a seed's canary leaves entries that loaded
        "fallback": {"counters": {}},
    }
    m, files = build_manifest("tiny", node_fingerprint(), "precompile", caps, {"precompile": meta})
    publish(store, m, files)


def env(tmp_path: Path, boot: str = "boot-a") -> dict[str, str]:
    return {"PYTHONPATH": str(tmp_path / "app"), "TORCHWARM_BOOT_ID": boot}


def run(cfg: Path, env: dict[str, str], *app_args: str):
    """`torchwarm run` of the app; (exit code, the app's flag line, torchwarm's stderr)."""
    p = torchwarm("run", "-c", str(cfg), "--", sys.executable, "-c", APP, *app_args, env=env,
                  check=False)  # fmt: skip
    flags = [line for line in p.stdout.splitlines() if line.startswith("flag=")]
    return p.returncode, flags[-1] if flags else None, p.stderr


def record(cfg: Path) -> Path:
    return cfg.parent / "volume" / "torchwarm-precompile.json"


def test_run_after_a_failed_start_goes_without_precompile_and_says_why(tmp_path):
    """The app exits 1 with the entries; the next `run` in that boot starts it without
    them, saying why in one line on stderr."""
    cfg = node(tmp_path)
    assert run(cfg, env(tmp_path), "1")[:2] == (1, "flag=1")
    rc, flag, err = run(cfg, env(tmp_path), "1")
    assert (rc, flag) == (0, "flag=None")
    (line,) = [x for x in err.splitlines() if "precompiled entries off" in x]
    assert "for this boot" in line and "exited 1" in line and "FX-graph warm" in line
    assert str(record(cfg)) in line  # where to delete it to try them again


def test_a_new_boot_tries_the_entries_again(tmp_path):
    """A failure in one boot leaves the next boot's first start with the entries."""
    cfg = node(tmp_path)
    assert run(cfg, env(tmp_path, "boot-a"), "1")[:2] == (1, "flag=1")
    assert run(cfg, env(tmp_path, "boot-b"), "0")[:2] == (0, "flag=1")


def test_new_entries_in_the_same_boot_are_tried_again(tmp_path):
    """The record is for the entries that failed: a pull that installs others tries them."""
    cfg = node(tmp_path)
    assert run(cfg, env(tmp_path), "1")[:2] == (1, "flag=1")
    store = LocalStore(tmp_path / "store")
    publish_capture(store, tmp_path / "capture-new", cfg, tmp_path / "app", "precompile", "b" * 64)
    assert run(cfg, env(tmp_path), "0")[:2] == (0, "flag=1")


def test_run_exits_with_the_apps_exit_code(tmp_path):
    """With precompile on, `run` waits for the app and exits as it did."""
    assert run(node(tmp_path), env(tmp_path), "3")[:2] == (3, "flag=1")


def test_an_app_killed_by_a_signal_is_a_failed_start(tmp_path):
    """An app that dies of SIGKILL (the OOM killer, a crash): `run` dies of SIGKILL too,
    and the next start goes without the entries."""
    cfg = node(tmp_path)
    assert run(cfg, env(tmp_path), "kill")[:2] == (-signal.SIGKILL, "flag=1")
    rc, flag, err = run(cfg, env(tmp_path), "kill")
    assert (rc, flag) == (0, "flag=None") and "killed by SIGKILL" in err


# Says it is ready, then waits for SIGTERM: dies of it, or handles it and exits 7.
WAITING = """
import os, signal, sys, time
if sys.argv[1] == "handle":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
print("flag=" + str(os.environ.get("TORCH_CACHING_PRECOMPILE")), flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize(("how", "code"), [("default", -signal.SIGTERM), ("handle", 7)])
def test_sigterm_to_run_reaches_the_app_and_is_no_failure(tmp_path, how, code):
    """SIGTERM to `run` (a pod's stop) goes to the app; `run` exits as the app did (dies of
    SIGTERM if it did), and the next start still has the entries."""
    cfg = node(tmp_path)
    p = spawn("run", "-c", str(cfg), "--", sys.executable, "-c", WAITING, how, env=env(tmp_path),
              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert p.stdout.readline().strip() == "flag=1"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == code, p.stderr.read()
    assert run(cfg, env(tmp_path), "0")[:2] == (0, "flag=1")


# Says it is ready, then waits for SIGINT and exits 5 on it.
INTERRUPTED = """
import os, signal, sys, time
signal.signal(signal.SIGINT, lambda *_: sys.exit(5))
print("flag=" + str(os.environ.get("TORCH_CACHING_PRECOMPILE")), flush=True)
time.sleep(60)
"""


def test_a_terminals_ctrl_c_is_a_stop_not_a_failed_start(tmp_path):
    """^C in a terminal (the kernel sends SIGINT to the app's process group itself, so
    `run` does not pass it on): the app stops, `run` exits as it did, and the next start
    still has the entries."""
    cfg = node(tmp_path)
    pid, fd = pty.fork()
    if pid == 0:  # the terminal's foreground process: `torchwarm run`
        try:
            os.execve(CLI[0], [*CLI, "run", "-c", str(cfg), "--", sys.executable, "-c",
                               INTERRUPTED], cli_env(env(tmp_path)))  # fmt: skip
        finally:
            os._exit(127)
    out = b""
    while b"flag=1" not in out:
        out += os.read(fd, 4096)
    os.write(fd, b"\x03")
    with contextlib.suppress(OSError):  # EIO once the terminal's last process is gone
        while chunk := os.read(fd, 4096):
            out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 5, out
    assert run(cfg, env(tmp_path), "0")[:2] == (0, "flag=1")


def test_run_without_precompile_still_execs_the_app(tmp_path):
    """No entries installed: `run` execs the app in its own process, as before."""
    cfg = node(tmp_path, fmt="cachedir")
    show = "import os; print(os.environ.get('TORCH_CACHING_PRECOMPILE'), os.getpid())"
    p = spawn("run", "-c", str(cfg), "--", sys.executable, "-c", show, env=env(tmp_path),
              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert out.split() == ["None", str(p.pid)]
    assert not record(cfg).exists()


# The app through the Python API: pull, activate, say what it got, then `argv[1]`.
API_APP = """
import json, os, sys, warnings
import torchwarm
report = torchwarm.pull({cfg!r})
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    torchwarm.activate(report)
print(json.dumps({{"flag": os.environ.get("TORCH_CACHING_PRECOMPILE"),
                  "warnings": [str(w.message) for w in seen]}}), flush=True)
if sys.argv[1] == "raise":
    raise AttributeError("'_Missing' object has no attribute '__name__'")
if sys.argv[1] == "kill":
    os.kill(os.getpid(), 9)
"""


def activate(cfg: Path, env: dict[str, str], then: str = "exit") -> tuple[int, dict]:
    """A fresh app process that calls pull() and activate(), then does `then`."""
    code = API_APP.format(cfg=str(cfg))
    p = subprocess.run([sys.executable, "-c", code, then], capture_output=True, text=True,
                       timeout=120, env=cli_env(env))  # fmt: skip
    return p.returncode, json.loads(p.stdout.strip().splitlines()[-1])


def test_activate_after_a_start_that_raised_leaves_precompile_off(tmp_path):
    """The first process raises at start (uncaught): the next activate() in that boot sets
    no TORCH_CACHING_PRECOMPILE and warns, naming the error."""
    cfg = node(tmp_path)
    rc, got = activate(cfg, env(tmp_path), "raise")
    assert rc == 1 and got == {"flag": "1", "warnings": []}
    _, got = activate(cfg, env(tmp_path))
    assert got["flag"] is None
    (warning,) = got["warnings"]
    assert "precompiled entries off for this boot" in warning and "AttributeError" in warning


def test_activate_after_a_start_killed_without_exiting_leaves_precompile_off(tmp_path):
    """A process SIGKILLed after activate() (a segfault, the OOM killer): the next
    activate() sees that it died and leaves precompile off."""
    cfg = node(tmp_path)
    rc, got = activate(cfg, env(tmp_path), "kill")
    assert rc == -9 and got["flag"] == "1"
    _, got = activate(cfg, env(tmp_path))
    assert got["flag"] is None
    (warning,) = got["warnings"]
    assert "died without exiting" in warning


def test_activate_after_a_clean_exit_keeps_precompile_on(tmp_path):
    """A process that exits normally leaves the next activate() its entries, no warning."""
    cfg = node(tmp_path)
    assert activate(cfg, env(tmp_path)) == (0, {"flag": "1", "warnings": []})
    assert activate(cfg, env(tmp_path)) == (0, {"flag": "1", "warnings": []})


@pytest.mark.parametrize(
    "junk",
    [b"\xff\x00 not json", b"[]", b"[" * 100_000, b'{"state": "failed"}',
     b'{"boot_id": "boot-a", "state": "failed", "entries": "x", "how": 1}'],
)  # fmt: skip
def test_a_junk_record_is_no_record(tmp_path, junk):
    """A damaged or foreign record file: the start goes with the entries."""
    cfg = node(tmp_path)
    record(cfg).parent.mkdir(parents=True)
    record(cfg).write_bytes(junk)
    assert run(cfg, env(tmp_path), "0")[:2] == (0, "flag=1")


def test_a_start_that_cannot_be_recorded_goes_without_precompile(tmp_path):
    """The record cannot be written (a folder in its place): a crash could not be
    remembered, so the app starts without the entries and `run` says why."""
    cfg = node(tmp_path)
    record(cfg).mkdir(parents=True)
    rc, flag, err = run(cfg, env(tmp_path), "1")
    assert (rc, flag) == (0, "flag=None")
    (line,) = [x for x in err.splitlines() if "precompiled entries off" in x]
    assert f"cannot record the start in {record(cfg)}" in line


def test_an_app_killed_by_sigterm_kills_run_by_sigterm(tmp_path):
    """An app that dies of SIGTERM: `run` dies of SIGTERM too (not exit 143, which
    systemd counts as a failure), and the death is a failed start."""
    cfg = node(tmp_path)
    die = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    p = torchwarm("run", "-c", str(cfg), "--", sys.executable, "-c", die, env=env(tmp_path),
                  check=False)  # fmt: skip
    assert p.returncode == -signal.SIGTERM, p.stderr
    rc, flag, err = run(cfg, env(tmp_path), "0")
    assert (rc, flag) == (0, "flag=None") and "killed by SIGTERM" in err


# Says it is ready and its pid; on SIGTERM says so and goes on (a stop it is slow to do).
SLOW_STOP = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: print("term", flush=True))
print("flag=" + str(os.environ.get("TORCH_CACHING_PRECOMPILE")), os.getpid(), flush=True)
while True:
    time.sleep(60)
"""


def test_a_stop_killed_after_its_grace_is_no_failed_start(tmp_path):
    """SIGTERM to `run`, then SIGKILL of `run` and the app (a pod's grace ran out): the
    next start in that boot still has the entries."""
    cfg = node(tmp_path)
    p = spawn("run", "-c", str(cfg), "--", sys.executable, "-c", SLOW_STOP, env=env(tmp_path),
              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    flag, app = p.stdout.readline().split()
    assert flag == "flag=1"
    p.send_signal(signal.SIGTERM)
    assert p.stdout.readline().strip() == "term"  # `run` passed the stop on
    os.kill(int(app), signal.SIGKILL)
    p.kill()
    p.wait(timeout=30)
    assert run(cfg, env(tmp_path), "0")[:2] == (0, "flag=1")


@pytest.mark.parametrize("fmt", ["precompile", "cachedir"])
def test_the_app_starts_with_sigpipe_not_ignored(tmp_path, fmt):
    """The app under `run` (a child with the entries, exec'd without) does not inherit
    Python's ignored SIGPIPE and SIGXFSZ."""
    cfg = node(tmp_path, fmt=fmt)
    p = torchwarm("run", "-c", str(cfg), "--", "grep", "SigIgn", "/proc/self/status",
                  env=env(tmp_path))  # fmt: skip
    ignored = int(p.stdout.split()[-1], 16)
    assert ignored & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1)) == 0, p.stdout
