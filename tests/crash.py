"""Run a torchwarm command and SIGKILL it at a chosen point: a crash, not a clean error.

Usage: python tests/crash.py POINT -- torchwarm-args...
The code under test is the real one; only the moment of death is injected.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


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


def main() -> int:
    point, sep, *args = sys.argv[1:]
    assert sep == "--"
    from agent import archive, install
    from agent.stores import local

    if point == "push-before-manifest":  # every blob written, the manifest not yet
        local.LocalStore.put_if_absent = lambda *a, **k: die()  # type: ignore[method-assign]
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
    else:
        raise SystemExit(f"unknown point {point!r}")
    from agent.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
