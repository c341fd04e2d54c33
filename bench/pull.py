"""Where a node's `torchwarm pull` spends its wall time, and the node's time to first result.

Seeds a local-folder store once (a warm-up with --push), then, side by side in one run:
  pulls   `--pulls` fresh pulls of the workload into empty cache dirs, each a new process,
          split into: process start (interpreter and imports until the CLI's STARTED
          clock), then the ready marker's timings (fingerprint, resolve, fetch, install;
          the rest of the pull is the supervisor's own work: its imports, the config,
          the fork, the lock), then the exit (report, interpreter shutdown). Each split
          pull runs the console script's two lines in `python -c` so that STARTED can be
          printed; the console script itself (`torchwarm pull`) is timed in the same
          rounds, wall only, to show they agree.
  imports one more pull under `-X importtime` (supervisor and forked worker): what the pull
          path imports, and that no cloud SDK, cryptography or torch is among it for a
          local-folder store without trusted keys (exits 1 if one is).
  first result  `--nodes` rounds of: cold (the app with an empty cache dir) and node
          (`torchwarm pull`, then the app, each a new process). The app is `torchwarm
          probe`: interpreter, torch import, torch.compile() and the first call of every
          input set (and an eager call to compare with), so its wall is what a node's
          main process waits before its first result.
Medians with [min-max]. The page cache is warm (no way to drop it on a shared machine).

    .venv/bin/python bench/pull.py [-c configs/example.yaml] [--pulls 10] [--nodes 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from nodes import ROOT, torchwarm

# The console script (`.venv/bin/torchwarm`), plus one line that prints the CLI's clock.
WRAPPER = (
    "import sys, time\n"
    "from torchwarm.cli import STARTED, main\n"
    "rc = main()\n"
    "print(f'bench-clock {STARTED!r} {time.monotonic()!r}', file=sys.stderr)\n"
    "sys.exit(rc)\n"
)
# What a local-folder pull without trusted keys must never import (each costs 0.1-1.5 s).
FORBIDDEN = ("boto3", "botocore", "s3transfer", "google", "cryptography", "torch", "triton")
GOAL_WALL_S, GOAL_BEYOND_TRANSFER_S = 0.5, 0.3  # issue #10, on this machine
STEPS = ("start", "fingerprint", "resolve", "fetch", "install", "rest", "exit")
LABELS = {
    "start": "process start (interpreter, imports until the CLI starts)",
    "fingerprint": "fingerprint",
    "resolve": "resolve (manifest read, parse, check)",
    "fetch": "fetch (download, verify, unpack: one stream)",
    "install": "install (link, sync, swap)",
    "rest": "rest of the pull (node imports, config, fork, lock)",
    "exit": "exit (marker, report, interpreter shutdown)",
    "wall": "wall",
    "script": "wall of the console script `torchwarm pull`",
    "beyond": "beyond the transfer (wall - fetch)",
}


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run `cmd`; return (monotonic before the spawn, wall seconds, the finished process)."""
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[-6:])} exited {proc.returncode}:\n{proc.stderr}")
    return t0, wall, proc


def pull_args(config: str, workload: str, cache_dir: Path) -> list[str]:
    return ["pull", "-c", config, "--workload", workload, "--require", "--cache-dir",
            str(cache_dir)]  # fmt: skip


def marker_of(cache_dir: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((cache_dir.parent / "torchwarm-ready.json").read_text())
    if doc["status"] != "warm":
        sys.exit(f"the pull into {cache_dir} did not end warm: {doc.get('reason')}")
    return doc


def split_pull(config: str, workload: str, cache_dir: Path, env: dict[str, str]) -> dict:
    """One fresh pull through WRAPPER, split into STEPS (seconds)."""
    args = pull_args(config, workload, cache_dir)
    t0, wall, proc = timed([sys.executable, "-c", WRAPPER, *args], env)
    clock = re.search(r"^bench-clock (\S+) (\S+)$", proc.stderr, re.M)
    assert clock, proc.stderr
    started = float(clock[1])
    t = marker_of(cache_dir)["timings"]

    def step(prefix: str) -> float:
        return sum(v for k, v in t.items() if k == prefix or k.startswith(prefix + "."))

    out = {s: step(f"{s}_s") for s in ("fingerprint", "resolve", "fetch", "install")}
    out["rest"] = t["total_s"] - sum(out.values())
    out["start"] = started - t0
    out["exit"] = wall - out["start"] - t["total_s"]
    out["wall"] = wall
    out["beyond"] = wall - out["fetch"]
    return out


def script_pull(config: str, workload: str, cache_dir: Path, env: dict[str, str]) -> float:
    script = Path(sys.executable).with_name("torchwarm")
    _, wall, _ = timed([str(script), *pull_args(config, workload, cache_dir)], env)
    marker_of(cache_dir)
    return wall


def imports(config: str, workload: str, cache_dir: Path, env: dict[str, str]) -> dict:
    """Self-time of every import of one pull (-X importtime), by top-level package."""
    cmd = [sys.executable, "-X", "importtime", "-m", "torchwarm.cli",
           *pull_args(config, workload, cache_dir)]  # fmt: skip
    _, _, proc = timed(cmd, env)
    by_pkg: dict[str, float] = defaultdict(float)
    count = 0
    for m in re.finditer(r"^import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)$", proc.stderr, re.M):
        by_pkg[m[2].split(".")[0]] += int(m[1]) / 1e6
        count += 1
    return {"modules": count, "by_pkg": dict(by_pkg)}


def app(config: str, workload: str, cache_dir: Path, env: dict[str, str]) -> tuple[float, dict]:
    """The app's wall seconds to its first result, and its probe report."""
    _, wall, proc = timed([sys.executable, "-m", "torchwarm.cli", "probe", "-c", config,
                           "--workload", workload, "--cache-dir", str(cache_dir), "--json"],
                          env)  # fmt: skip
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def spread(xs: list[float], digits: int = 3) -> str:
    return f"{statistics.median(xs):.{digits}f} [{min(xs):.{digits}f}-{max(xs):.{digits}f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default=str(ROOT / "configs" / "example.yaml"))
    ap.add_argument("--workload", default=None, help="default: the config's first workload")
    ap.add_argument("--pulls", type=int, default=10, help="fresh pulls timed (each way)")
    ap.add_argument("--nodes", type=int, default=3, help="cold/node rounds for first result")
    a = ap.parse_args()
    from torchwarm import config as cfgmod

    cfg = cfgmod.load(a.config)
    workload = a.workload or cfg.workloads[0].name
    with tempfile.TemporaryDirectory(prefix="torchwarm-bench-pull-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "TORCHWARM_STORE": (work / "store").as_uri()}
        env.pop("TORCHWARM_TRUSTED_KEYS", None)
        print(f"seed: warm-up of {workload!r} and push to a local-folder store …", flush=True)
        torchwarm("warmup", "-c", a.config, "--workload", workload, "--push", env=env)

        splits: dict[str, list[float]] = defaultdict(list)
        for i in range(a.pulls):  # interleaved: the split pull, then the console script
            for k, v in split_pull(a.config, workload, work / f"p{i}" / "inductor", env).items():
                splits[k].append(v)
            splits["script"].append(script_pull(a.config, workload, work / f"s{i}" / "inductor",
                                                env))  # fmt: skip
        imp = imports(a.config, workload, work / "imports" / "inductor", env)
        size = marker_of(work / "p0" / "inductor")["workloads"][0]["bytes"]

        cold: list[float] = []
        node: list[float] = []
        pulls: list[float] = []
        apps: list[float] = []
        first: dict[str, list[float]] = defaultdict(list)
        for i in range(a.nodes):
            wall, rep = app(a.config, workload, work / f"cold-{i}" / "inductor", env)
            cold.append(wall)
            first["cold"].append(rep["first_call_s"])
            where = work / f"node-{i}" / "inductor"
            pulls.append(script_pull(a.config, workload, where, env))
            wall, rep = app(a.config, workload, where, env)
            c = rep["counters"]
            if c["fxgraph_cache_miss"] or rep["new_so_files"]:
                sys.exit(f"node {i} missed torch's cache after the pull: {c}")
            apps.append(wall)
            node.append(pulls[-1] + wall)
            first["node"].append(rep["first_call_s"])
            print(f"round {i + 1}/{a.nodes}: cold {cold[-1]:.2f} s, node {node[-1]:.2f} s "
                  f"(pull {pulls[-1]:.3f} + app {wall:.2f})", flush=True)  # fmt: skip

    print(f"\npull of {workload!r} ({size} bytes) from a local-folder store, {a.pulls} fresh "
          "pulls, seconds, median [min-max]:")  # fmt: skip
    for k in (*STEPS, "wall", "script", "beyond"):
        print(f"  {LABELS[k]:60} {spread(splits[k])}")
    wall, beyond = statistics.median(splits["script"]), statistics.median(splits["beyond"])
    print(f"goal (#10): wall <= {GOAL_WALL_S} s: {'met' if wall <= GOAL_WALL_S else 'NOT met'} "
          f"({wall:.3f}); beyond the transfer <= {GOAL_BEYOND_TRANSFER_S} s: "
          f"{'met' if beyond <= GOAL_BEYOND_TRANSFER_S else 'NOT met'} ({beyond:.3f})")  # fmt: skip

    top = sorted(imp["by_pkg"].items(), key=lambda kv: -kv[1])
    total = sum(imp["by_pkg"].values())
    print(f"\nimports of one pull (-X importtime, both processes): {imp['modules']} modules, "
          f"{total * 1000:.0f} ms of self time; largest: "
          + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in top[:6]))  # fmt: skip
    bad = sorted(p for p in imp["by_pkg"] if p in FORBIDDEN)
    print(f"  cloud SDKs, cryptography, torch imported: {', '.join(bad) or 'none'}")

    print(f"\ntime to first result, {a.nodes} round(s), seconds, median [min-max] (app: "
          "interpreter, torch import, torch.compile(), first calls):")  # fmt: skip
    print(f"  cold  (app, empty cache dir)   {spread(cold, 2)}   of which first calls "
          f"{spread(first['cold'], 2)}")  # fmt: skip
    print(f"  node  (pull + app)             {spread(node, 2)}   = pull {spread(pulls)} "
          f"+ app {spread(apps, 2)} (first calls {spread(first['node'], 2)})")  # fmt: skip
    print(
        f"  cold / node                    {statistics.median(cold) / statistics.median(node):.1f}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
