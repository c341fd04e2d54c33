"""What the benches share: torchwarm commands run as a seed or a node would, each in a
new process, and what a pull tells the app (the ready marker: precompiled or not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PRECOMPILE_ENV = {"TORCH_CACHING_PRECOMPILE": "1"}


class CommandFailed(Exception):
    """A torchwarm command exited non-zero; the message is its last stderr line."""


def run(cmd: list[str], env: dict[str, str] | None, timeout: float | None) -> str:
    proc = subprocess.run(
        cmd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["?"]
        what = " ".join(Path(c).name for c in cmd[1:4])
        raise CommandFailed(f"{what} exited {proc.returncode}: {lines[-1]}")
    return proc.stdout


def torchwarm(*args: str, env: dict[str, str] | None = None, timeout: float | None = None) -> str:
    return run([sys.executable, "-m", "torchwarm.cli", *args], env, timeout)


def probe(
    config: str, cache_dir: Path, workload: str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """First-call seconds and torch's counters of the workload in a new process."""
    out = torchwarm("probe", "-c", config, "--workload", workload, "--cache-dir",
                    str(cache_dir), "--json", env=env)  # fmt: skip
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return report


def pull(
    config: str, workload: str, cache_dir: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Pull the workload into `cache_dir` as a new node; return what the app must know:
    {"format", "precompiled", "reason", "app_env", "pull_s"} (app_env: to add to the app's
    env; pull_s: the wall seconds of the `torchwarm pull` process)."""
    t0 = time.monotonic()
    torchwarm("pull", "-c", config, "--workload", workload, "--require", "--cache-dir",
              str(cache_dir), env=env)  # fmt: skip
    pull_s = time.monotonic() - t0
    marker = json.loads((cache_dir.parent / "torchwarm-ready.json").read_text())
    (outcome,) = marker["workloads"]
    precompiled = bool(outcome.get("precompiled"))
    return {
        "format": outcome["format"],
        "precompiled": precompiled,
        "reason": outcome.get("precompile_reason", ""),
        "app_env": dict(PRECOMPILE_ENV) if precompiled else {},
        "pull_s": pull_s,
    }


def counters_line(c: dict[str, int]) -> str:
    """Hit/miss counters, short: dynamo h/m, fxgraph h/m, aot h/m."""
    return (
        f"dyn {c.get('dynamo_cache_hit', 0)}/{c.get('dynamo_cache_miss', 0)} "
        f"fx {c.get('fxgraph_cache_hit', 0)}/{c.get('fxgraph_cache_miss', 0)} "
        f"aot {c.get('autograd_cache_hit', 0)}/{c.get('autograd_cache_miss', 0)}"
    )
