"""Path-exact warm-ups: a command workload (and a model workload with at_node_path) warms
up with its cache at the config's cache_dir, the node's own path, so that a cache whose
entries hold their absolute root (vLLM's standalone-compile handles) hits on the node.

The app is tests/path_app.py: its entry records its cache root ($APP_CACHE_ROOT, set to
{cache_dir}/app) and it refuses an entry recorded for another root. Whatever was at
cache_dir on the seed is set aside and restored, under a lock (torchwarm.seed.nodepath).
Seeds and nodes run as new processes; no test compiles.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import spawn, torchwarm
from factories import alive

from torchwarm import config
from torchwarm.errors import Cancelled, ConfigError, WarmupError
from torchwarm.seed import kinds, nodepath, warmup

pytestmark = pytest.mark.usefixtures("trust_the_vector_isa")

APP = Path(__file__).with_name("path_app.py")
ROOT_ENV = {"APP_CACHE_ROOT": "{cache_dir}/app"}


def setup(folder: Path, *args: str, cache_dir: Path | None = None, **extra: Any) -> Path:
    """A config in `folder` running path_app.py with `args`: local store `store/`,
    cache_dir `node/inductor` (or `cache_dir`), the app's root under it."""
    folder.mkdir(parents=True, exist_ok=True)
    workload = {"name": "app", "command": [sys.executable, str(APP), *args],
                "code": [str(APP)], **extra}  # fmt: skip
    doc = {"store": "store", "cache_dir": str(cache_dir or "node/inductor"), "env": ROOT_ENV,
           "workloads": [workload]}  # fmt: skip
    path = folder / "torchwarm.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def tree(root: Path) -> dict[str, str]:
    """Every entry under `root`, relative, with a file's text, a link's target or 'dir'."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = (f"-> {os.readlink(p)}" if p.is_symlink() else
                    "dir" if p.is_dir() else p.read_text())  # fmt: skip
    return out


def original(cache_dir: Path) -> dict[str, str]:
    """Put a seed's own cache at `cache_dir` (files, a folder, a link) and return its tree."""
    (cache_dir / "fxgraph" / "ab").mkdir(parents=True)
    (cache_dir / "fxgraph" / "ab" / "entry").write_text("the seed's own compile\n")
    (cache_dir / "app").mkdir()
    (cache_dir / "app" / "entry.json").write_text(json.dumps({"root": "/elsewhere"}))
    (cache_dir / "link").symlink_to("fxgraph")
    return tree(cache_dir)


def siblings(cache_dir: Path) -> list[str]:
    """What torchwarm left beside cache_dir, other than its lock file."""
    mine = (cache_dir.name, cache_dir.name + nodepath.LOCK_SUFFIX)
    return sorted(p.name for p in cache_dir.parent.iterdir() if p.name not in mine)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the acceptance: seed → store → node → app ---------------------------------------------


def test_a_cache_that_holds_its_root_hits_on_the_node(tmp_path):
    """Seed (warmup --out, push --from), then a fresh pull into the config's cache_dir and
    the app under `torchwarm run`: the app hits the seed's entry instead of refusing it."""
    cfg = setup(tmp_path)
    out = tmp_path / "out"
    torchwarm("warmup", "-c", str(cfg), "--out", str(out))
    assert (out / "app" / "cache" / "app" / "entry.json").is_file()  # push --from's layout
    torchwarm("push", "-c", str(cfg), "--from", str(out))
    cache_dir = tmp_path / "node" / "inductor"
    assert not cache_dir.exists()  # nothing was there before the seed: nothing is after
    assert "warm: app" in torchwarm("pull", "-c", str(cfg), "--require").stdout
    proc = torchwarm("run", "-c", str(cfg), "--", sys.executable, str(APP), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["hit"] is True and line["root"] == str(cache_dir / "app")


def test_a_node_at_another_path_says_the_seed_warmed_elsewhere(tmp_path):
    """A node whose cache_dir is not the one a path-exact warm-up compiled at still
    installs warm, and its pull says where the seed compiled and that such caches miss."""
    cfg = setup(tmp_path)
    torchwarm("warmup", "-c", str(cfg), "--push")
    elsewhere = tmp_path / "other" / "inductor"
    said = torchwarm("pull", "-c", str(cfg), "--require", "--cache-dir", str(elsewhere)).stdout
    assert "warm: app" in said
    assert (
        f"warmed at another path: app: the seed compiled it with its cache at "
        f"{tmp_path / 'node' / 'inductor'}, this node's cache_dir is {elsewhere}"
    ) in said
    same = torchwarm("pull", "-c", str(cfg), "--require").stdout  # at the seed's path
    assert "warm: app" in same and "another path" not in same


# -- what was at cache_dir on the seed -----------------------------------------------------


@pytest.mark.parametrize("fail", [False, True], ids=["success", "failure"])
def test_the_seeds_own_cache_dir_is_intact_after_a_warm_up(tmp_path, fail):
    """A warm-up at the node's path (that succeeds, or whose command exits 3) leaves the
    seed's own tree at cache_dir as it was, nothing beside it but the lock, and the
    warm-up's tree (not the seed's) in the output folder."""
    cache_dir = tmp_path / "node" / "inductor"
    before = original(cache_dir)
    cfg = setup(tmp_path, *(("--fail",) if fail else ()), "--record", str(tmp_path / "rec"))
    proc = torchwarm("warmup", "-c", str(cfg), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == (7 if fail else 0), proc.stderr
    assert tree(cache_dir) == before
    assert siblings(cache_dir) == []
    (seen,) = records(tmp_path / "rec")
    assert seen["listed"] == [] and seen["root"] == str(cache_dir / "app")
    if not fail:
        entry = json.dumps({"root": str(cache_dir / "app")})
        assert tree(tmp_path / "out" / "app" / "cache") == {"app": "dir", "app/entry.json": entry}


def hanging_seed(
    tmp_path: Path, out: Path, **popen: Any
) -> tuple[Path, subprocess.Popen[str], int]:
    """`torchwarm warmup --out OUT` of a command that hangs at the node's path, once that
    command runs: (its config, the seed process, the command's pid)."""
    pid_file = tmp_path / "app.pid"
    cfg = setup(tmp_path, "--hang", str(pid_file))
    seed = spawn("warmup", "-c", str(cfg), "--out", str(out), stdout=subprocess.DEVNULL, **popen)
    deadline = time.monotonic() + 60
    while not pid_file.exists() and seed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_file.exists(), f"the hanging command never started (seed exit {seed.poll()})"
    return cfg, seed, int(pid_file.read_text())


def test_a_seed_killed_mid_warm_up_is_undone_by_the_next_one(tmp_path):
    """A seed killed with SIGKILL while its command hangs leaves the seed's tree set aside;
    the next warm-up puts it back before anything else: its command starts in an empty
    cache_dir (not the dead one's) and afterwards the seed's tree is back as it was."""
    cache_dir = tmp_path / "node" / "inductor"
    before = original(cache_dir)
    cfg, seed, app_pid = hanging_seed(tmp_path, tmp_path / "out1", stderr=subprocess.DEVNULL)
    try:
        assert (cache_dir / "app" / "entry.json").read_text() == json.dumps(
            {"root": str(cache_dir / "app")})  # the dead warm-up's, at the node's path  # fmt: skip
        seed.send_signal(signal.SIGKILL)
        seed.wait(10)
    finally:
        os.kill(app_pid, signal.SIGKILL)  # its process group outlives a SIGKILLed seed
    while alive(app_pid):
        time.sleep(0.05)
    assert tree(cache_dir) != before  # still the dead warm-up's
    setup(tmp_path, "--record", str(tmp_path / "rec"))
    torchwarm("warmup", "-c", str(cfg), "--out", str(tmp_path / "out2"))
    (seen,) = records(tmp_path / "rec")
    assert seen["listed"] == [] and seen["root"] == str(cache_dir / "app")
    assert tree(cache_dir) == before and siblings(cache_dir) == []


def test_sigterm_to_a_warm_up_stops_its_command_and_puts_the_seeds_tree_back(tmp_path):
    """SIGTERM to `torchwarm warmup` (a Job deleted, a ^C'd shell's kill) while its command
    hangs at the node's path: the command's process group is stopped, the seed's own tree
    is back at cache_dir with nothing beside it, and warmup exits 130 saying cancelled."""
    cache_dir = tmp_path / "node" / "inductor"
    before = original(cache_dir)
    _, seed, app_pid = hanging_seed(tmp_path, tmp_path / "out", stderr=subprocess.PIPE)
    try:
        seed.send_signal(signal.SIGTERM)
        _, err = seed.communicate(timeout=30)
        gone = not alive(app_pid)
    finally:
        if alive(app_pid):
            os.kill(app_pid, signal.SIGKILL)
    assert seed.returncode == 130, err
    assert "cancelled" in err and gone
    assert tree(cache_dir) == before and siblings(cache_dir) == []


# -- one warm-up at a time -----------------------------------------------------------------


def test_a_lock_held_past_the_warm_ups_timeout_is_a_warmup_error(tmp_path):
    """Another warm-up that holds cache_dir's lock longer than this one's warmup_timeout_s
    (a seed stuck elsewhere) fails this warm-up with a WarmupError naming the lock file,
    instead of waiting for ever (the CLI's warm-up has no stop event to end the wait)."""
    import fcntl

    cache_dir = tmp_path / "node" / "inductor"
    cache_dir.parent.mkdir(parents=True)
    lock = cache_dir.parent / (cache_dir.name + nodepath.LOCK_SUFFIX)
    held = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)
    got: list[BaseException] = []

    def wait() -> None:
        try:
            with nodepath.lend(cache_dir, tmp_path / "keep", None, "workload 'app'", wait_s=0.5):
                pass
        except BaseException as e:  # whatever it was: the test looks at it
            got.append(e)

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    t.join(20)
    os.close(held)
    assert not t.is_alive(), "lend waited for ever"
    (e,) = got
    assert isinstance(e, WarmupError) and str(lock) in str(e) and "0.5 s" in str(e), e


def test_two_seeds_at_once_never_share_cache_dir(tmp_path):
    """Two seeds (two configs naming one cache_dir) started together: the second waits for
    the first's lock, so each command has cache_dir to itself, empty, and both succeed."""
    cache_dir = tmp_path / "shared" / "inductor"
    before = original(cache_dir)
    rec = tmp_path / "rec"
    cfgs = [setup(tmp_path / n, "--sleep", "2", "--record", str(rec), cache_dir=cache_dir)
            for n in ("a", "b")]  # fmt: skip
    seeds = [spawn("warmup", "-c", str(c), "--out", str(c.parent / "out"),
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for c in cfgs]  # fmt: skip
    for s in seeds:
        out, _ = s.communicate(timeout=120)
        assert s.returncode == 0, out
    first, second = sorted(records(rec), key=lambda r: r["start"])
    assert first["root"] == second["root"] == str(cache_dir / "app")
    assert first["listed"] == second["listed"] == []
    assert first["end"] <= second["start"], (first, second)
    assert tree(cache_dir) == before and siblings(cache_dir) == []


def test_two_threads_never_hold_cache_dir_at_once(tmp_path):
    """In one process (a daemon's threads), a second lend of the same cache_dir waits until
    the first one ends."""
    cache_dir = tmp_path / "node" / "inductor"
    first_in, first_go, second_in = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with nodepath.lend(cache_dir, tmp_path / "out1" / "cache"):
            first_in.set()
            first_go.wait(30)

    def second() -> None:
        with nodepath.lend(cache_dir, tmp_path / "out2" / "cache"):
            second_in.set()

    (tmp_path / "out1").mkdir()
    (tmp_path / "out2").mkdir()
    a, b = threading.Thread(target=first), threading.Thread(target=second)
    a.start()
    assert first_in.wait(10)
    b.start()
    assert not second_in.wait(1.0)
    first_go.set()
    assert second_in.wait(10)
    a.join(10)
    b.join(10)


def test_waiting_for_the_lock_respects_cancellation(tmp_path):
    """A warm-up waiting for another's lock raises Cancelled once its stop event is set,
    and leaves the holder's cache_dir alone."""
    cache_dir = tmp_path / "node" / "inductor"
    (tmp_path / "out").mkdir()
    stop = threading.Event()
    with nodepath.lend(cache_dir, tmp_path / "out" / "cache"):
        (cache_dir / "mine").write_text("held\n")
        threading.Timer(0.5, stop.set).start()
        with pytest.raises(Cancelled), nodepath.lend(cache_dir, tmp_path / "x", stop=stop):
            pass
        assert (cache_dir / "mine").read_text() == "held\n"


def test_an_unwritable_parent_is_a_config_error(tmp_path):
    """A cache_dir whose folder the seed cannot write (sysfs refuses new files, to root
    too): exit 2, one line naming it and both ways out."""
    cfg = setup(tmp_path, cache_dir=Path("/sys/torchwarm-test-inductor"))
    proc = torchwarm("warmup", "-c", str(cfg), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert "/sys is not writable" in line
    assert "at_node_path: false" in line and "where cache_dir is writable" in line


@pytest.mark.parametrize("code", [errno.EBUSY, errno.EPERM], ids=["mount-point", "sticky"])
def test_a_cache_dir_that_cannot_be_renamed_is_a_config_error(tmp_path, monkeypatch, code):
    """A cache_dir that is a mount point (EBUSY) or that the seed may not rename (EPERM in
    a sticky folder) cannot be set aside: one ConfigError line saying so and the ways out,
    and the seed's tree stays at cache_dir as it was."""
    cache_dir = tmp_path / "node" / "inductor"
    before = original(cache_dir)
    real = os.rename

    def rename(src, dst, *args, **kwargs):
        if Path(src) == cache_dir:
            raise OSError(code, os.strerror(code), str(src), str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(ConfigError) as e, nodepath.lend(cache_dir, tmp_path / "out", who="'app'"):
        pytest.fail("lent a cache_dir that was never set aside")
    msg = str(e.value)
    assert "\n" not in msg and f"'app' warms up at the node's path, cache_dir {cache_dir}" in msg
    assert ("a mount point" if code == errno.EBUSY else "may not rename it") in msg, msg
    assert "a path under a volume rather than its mount point" in msg, msg
    assert "at_node_path: false" in msg, msg
    assert tree(cache_dir) == before and siblings(cache_dir) == []


# -- which workloads warm at the node's path -----------------------------------------------


@pytest.mark.parametrize("kind", ["command", "model"])
def test_at_node_path_defaults_on_for_commands_only(tmp_path, kind):
    """A command workload warms at the node's path unless told not to; a model workload
    only when it sets at_node_path: true."""
    w: dict[str, Any] = (
        {"name": "w", "command": ["x"]} if kind == "command"
        else {"name": "w", "model": "torchwarm.models:mlp", "inputs": [[{"shape": [1, 32]}]]}
    )  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"store": "s", "cache_dir": "c", "workloads": [w]}))
    assert config.load(path, environ={}).workloads[0].at_node_path is (kind == "command")


@pytest.mark.parametrize("at_node_path", [False, True])
def test_a_model_workload_compiles_where_at_node_path_says(tmp_path, monkeypatch, at_node_path):
    """The cache dir a model workload's child gets: a fresh folder in the output folder by
    default (cache_dir is not touched), cache_dir itself with at_node_path: true."""
    path = tmp_path / "c.yaml"
    w = {"name": "m", "model": "torchwarm.models:mlp", "inputs": [[{"shape": [1, 32]}]],
         "at_node_path": at_node_path}  # fmt: skip
    path.write_text(yaml.safe_dump({"store": "s", "cache_dir": "node/inductor", "workloads": [w]}))
    cfg = config.load(path, environ={})
    got = []

    def spy(cfg: Any, w: Any, fmt: str, cache: Path, out_dir: Path, **_: Any) -> Any:
        got.append(cache)
        raise WarmupError("spy: not compiling")

    monkeypatch.setattr(kinds, "run", spy)
    with pytest.raises(WarmupError, match="spy"):
        warmup.warmup(cfg, cfg.workloads[0], tmp_path / "out")
    assert got == [cfg.cache_dir if at_node_path else tmp_path / "out" / "cache"]
    assert cfg.cache_dir.exists() is False


def test_daemon_rewarms_a_path_exact_workload_when_cache_dir_moves(tmp_path):
    """daemon --once skips an unchanged path-exact command, and warms it again once
    cache_dir names another path (its cache holds the old one, which nodes no longer use)."""

    def once(cfg: Path) -> list[str]:
        out = torchwarm("daemon", "-c", str(cfg), "--once").stdout
        return [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]

    cfg = setup(tmp_path)
    assert "published" in once(cfg)
    assert "skipped_present" in once(cfg)
    setup(tmp_path, cache_dir=tmp_path / "moved" / "inductor")
    assert "published" in once(cfg)


def test_cache_dir_is_in_the_key_of_path_exact_workloads_only(tmp_path):
    """The warm-up key takes cache_dir for a workload with at_node_path, not for another."""
    cfg = config.load(setup(tmp_path), environ={})
    (w,) = cfg.workloads
    key = warmup.warmup_key
    assert key(w, "cachedir", "0" * 32, cache_dir=Path("/a")) != key(
        w, "cachedir", "0" * 32, cache_dir=Path("/b"))  # fmt: skip
    fresh = replace(w, at_node_path=False)
    assert key(fresh, "cachedir", "0" * 32, cache_dir=Path("/a")) == key(
        fresh, "cachedir", "0" * 32, cache_dir=Path("/b"))  # fmt: skip
