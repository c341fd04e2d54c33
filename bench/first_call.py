"""First-call seconds on a fresh node, per capture format: cold, after pull, local-warm.

Every number comes from `torchwarm probe` in a new process: torch.compile() plus the first
call of every input set (torch and backend imports excluded), run side by side in one
invocation because this machine is noisy:
    cold          empty cache dir
    node          empty cache dir, then a pull from a local-folder store; for `precompile`
                  the app runs with TORCH_CACHING_PRECOMPILE=1 when the pull installed
                  the precompiled entries (bench/nodes.py), which torch loads in
                  torch.compile() ("load" below; milliseconds on the FX-graph path)
    pull          the wall seconds of the node's pull (`torchwarm pull`, a new process; where
                  they go: bench/pull.py)
    local-warm    the node's cache dir again, now warmed by its own first run, without
                  precompile: the speed a node reaches through the FX-graph cache
Two ratios against local-warm: "warm" counts the node's torch.compile() (where precompile
loads its entries) and first calls, the time until the app is warm; "calls" counts only
the first calls after torch.compile() returned, which is how #11 measured its 0.005.
Usage: python bench/first_call.py [-c configs/example.yaml]
       [--formats cachedir,megacache,precompile] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from nodes import ROOT, counters_line, probe, pull, torchwarm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default=str(ROOT / "configs" / "example.yaml"))
    ap.add_argument("--workload", default=None, help="default: the config's first workload")
    ap.add_argument("--formats", default="cachedir,megacache,precompile",
                    help="comma-separated, or 'config' for the config's own format")  # fmt: skip
    ap.add_argument("--repeat", type=int, default=3, help="nodes per format (median reported)")
    a = ap.parse_args()
    from torchwarm import config as cfgmod

    cfg = cfgmod.load(a.config)
    workload = a.workload or cfg.workloads[0].name
    formats = [cfg.format] if a.formats == "config" else a.formats.split(",")
    rows: dict[str, dict[str, list[float]]] = {}
    counters: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="torchwarm-bench-") as tmp:
        work = Path(tmp)
        envs = {}
        for fmt in formats:
            envs[fmt] = {"TORCHWARM_STORE": (work / f"store-{fmt}").as_uri(),
                         "TORCHWARM_FORMAT": fmt}  # fmt: skip
            print(f"[{fmt}] seed: warm-up and push …", flush=True)
            torchwarm("warmup", "-c", a.config, "--workload", workload, "--push", env=envs[fmt])
            rows[fmt] = {"pull": [], "node": [], "load": [], "local-warm": []}
        cold = []
        # Rounds interleave the formats so that machine noise hits them alike.
        for i in range(a.repeat):
            empty = work / f"cold-{i}"
            cold.append(probe(a.config, empty, workload)["first_call_s"])
            shutil.rmtree(empty, ignore_errors=True)
            line = [f"round {i + 1}/{a.repeat}: cold {cold[-1]:.2f} s"]
            for fmt in formats:
                node = work / f"node-{fmt}-{i}" / "inductor"
                got = pull(a.config, workload, node, env=envs[fmt])
                if fmt == "precompile" and not got["precompiled"]:
                    print(f"[{fmt}] entries left out: {got['reason']}", flush=True)
                after_pull = probe(a.config, node, workload, env=got["app_env"])
                c = after_pull["counters"]
                if c["fxgraph_cache_miss"] and not c.get("dynamo_cache_hit"):
                    sys.exit(f"[{fmt}] the node missed torch's cache: {c}")
                counters[fmt] = counters_line(c)
                rows[fmt]["pull"].append(got["pull_s"])
                rows[fmt]["node"].append(after_pull["first_call_s"])
                rows[fmt]["load"].append(after_pull["compile_s"])
                rows[fmt]["local-warm"].append(probe(a.config, node, workload)["first_call_s"])
                line.append(f"{fmt} pull {got['pull_s']:.3f} s, node "
                            f"{rows[fmt]['node'][-1]:.3f} s / local-warm "
                            f"{rows[fmt]['local-warm'][-1]:.2f} s")  # fmt: skip
            print(", ".join(line), flush=True)
    c = statistics.median(cold)
    print(f"\nworkload {workload!r}, median of {a.repeat} fresh node(s) per format, seconds "
          f"of torch.compile() + first calls (node: of which load in torch.compile()); "
          f"pull: wall of the node's `torchwarm pull` process")  # fmt: skip
    print(f"{'format':10} {'cold':>7} {'pull':>6} {'node':>7} {'load':>6} {'calls':>6} "
          f"{'local-warm':>11} {'warm ratio':>11} {'calls ratio':>12} {'cold/node':>10}  "
          f"node counters (hit/miss)")  # fmt: skip
    for fmt, r in rows.items():
        n, w = statistics.median(r["node"]), statistics.median(r["local-warm"])
        load, p = statistics.median(r["load"]), statistics.median(r["pull"])
        calls = statistics.median(a - b for a, b in zip(r["node"], r["load"], strict=True))
        print(f"{fmt:10} {c:7.2f} {p:6.3f} {n:7.3f} {load:6.3f} {calls:6.3f} {w:11.2f} "
              f"{n / w:11.3f} {calls / w:12.4f} {c / n:10.1f}  "
              f"{counters[fmt]}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
