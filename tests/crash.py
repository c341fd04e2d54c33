"""Run a torchwarm command and SIGKILL it at a chosen point: a crash, not a clean error.

Usage: python tests/crash.py POINT -- torchwarm-args... (POINT: a mode below, or
random-push:SEED:UPPER / random-pull:SEED:UPPER, see random_points).
The code under test is the real one; only the moment of death is injected. Death takes
the whole process group, as when a pod or VM dies: a pull's supervisor and its worker
together (callers start this script in a session of its own).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def die() -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)


def after(n: int, fn: Any) -> Any:
    """Wrap `fn` so that the process dies on its n-th call, before the call runs."""
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == n:
            die()
        return fn(*args, **kwargs)

    return wrapper


def random_points(pull: bool, seed: str, upper: int) -> None:
    """Patch the write paths of push (local store) or pull (fetch, install) to die at a random call.

    Points: os.fsync / replace / rename / link / unlink / chmod (every temp file, rename,
    link and cleanup of the local store and the installer), the local store's copy (which
    writes half the blob first), each piece of a streamed blob as it is read
    (fetch._Reader._take), archive._write_member, install.sync_volume and
    install._exchange. A pull counts only after its fingerprint
    is read, in its worker process (where every write to the cache dir happens); the
    supervisor's marker write is not a point.
    """
    import atexit
    import random

    from torchwarm.env import fingerprint
    from torchwarm.node import fetch, install
    from torchwarm.node import job as pulljob
    from torchwarm.spec import archive
    from torchwarm.stores import local

    target = 0 if seed == "count" else random.Random(int(seed)).randint(1, upper)
    state = {"calls": 0, "armed": not pull}

    def hit(half_copy: Any = None) -> None:
        if not state["armed"]:
            return
        state["calls"] += 1
        if state["calls"] == target:
            if half_copy is not None:
                half_copy()
            die()

    def point(fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            hit()
            return fn(*args, **kwargs)

        return wrapper

    for name in ("fsync", "replace", "rename", "link", "unlink", "chmod"):
        setattr(os, name, point(getattr(os, name)))
    archive._write_member = point(archive._write_member)  # type: ignore[assignment]
    install.sync_volume = point(install.sync_volume)  # type: ignore[assignment]
    install._exchange = point(install._exchange)  # type: ignore[assignment]
    fetch._Reader._take = point(fetch._Reader._take)  # type: ignore[method-assign]
    real_copy = local.shutil.copyfileobj

    def copy(src: Any, dst: Any, length: int = 0) -> None:
        def half() -> None:
            dst.write(src.read(max(1, os.fstat(src.fileno()).st_size // 2)))
            dst.flush()

        hit(half)
        real_copy(src, dst, length)

    local.shutil.copyfileobj = copy  # type: ignore[assignment]
    real_collect = fingerprint.collect

    def collect(*args: Any, **kwargs: Any) -> Any:
        fields = real_collect(*args, **kwargs)
        state["armed"] = True
        return fields

    fingerprint.collect = collect  # type: ignore[assignment]
    if seed != "count":
        return
    if not pull:
        atexit.register(lambda: print(f"crash points: {state['calls']}", file=sys.stderr))
        return
    real_run = pulljob.PullJob.run

    def run(self: Any) -> None:  # in the worker, which leaves by os._exit (no atexit)
        real_run(self)
        print(f"crash points: {state['calls']}", file=sys.stderr, flush=True)

    pulljob.PullJob.run = run  # type: ignore[method-assign]


def main() -> int:
    point, sep, *args = sys.argv[1:]
    assert sep == "--"
    from torchwarm.node import install
    from torchwarm.spec import archive
    from torchwarm.stores import local

    if point == "push-before-manifest":  # every blob written, the manifest not yet
        local.LocalStore.put_if_version = lambda *a, **k: die()  # type: ignore[method-assign]
    elif point == "push-mid-blob":  # half of a blob's bytes written to its temp file
        real_copy = local.shutil.copyfileobj

        def half_then_die(src: Any, dst: Any, length: int = 0) -> None:
            dst.write(src.read(max(1, os.fstat(src.fileno()).st_size // 2)))
            dst.flush()
            die()

        local.shutil.copyfileobj = half_then_die  # type: ignore[assignment]
        assert real_copy
    elif point == "pull-mid-extract":  # some archive members written into staging
        archive._write_member = after(3, archive._write_member)  # type: ignore[assignment]
    elif point == "pull-between-renames":  # old tree moved away, new one not yet in place
        install._exchange = lambda a, b: False  # type: ignore[assignment]
        real_rename = os.rename

        def rename(src: Any, dst: Any) -> None:
            if os.path.basename(src).startswith("staging-"):
                die()
            real_rename(src, dst)

        install.os.rename = rename  # type: ignore[attr-defined]
    elif point.startswith(("random-push:", "random-pull:")):
        # random-push:SEED:UPPER / random-pull:SEED:UPPER: die at call K, K uniform in
        # [1, UPPER], counting calls of every patched write-path function; SEED "count"
        # never dies and prints "crash points: N" (the calls a full run makes) at exit.
        kind, seed, upper = point.split(":")
        random_points(kind == "random-pull", seed, int(upper))
    else:
        raise SystemExit(f"unknown point {point!r}")
    from torchwarm.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
