"""A fleet pulling at once: pulls/s and per-pull wall of many `torchwarm pull` processes.

Starts its own SeaweedFS on loopback (as the tests do), publishes a made-up cache of
`--blob-mb` for this machine's fingerprint (tests/synthetic.py), then per round:
  alone   `--alone` single pulls, one after another (the unloaded baseline)
  fleet   `--nodes` pulls started at once, each a new process into its own cache dir
and once more the fleet through the recording proxy (tests/faultproxy.py, no faults), to
count the requests the store saw per node (its wall is not used: the proxy is Python).
Prints pulls/s (nodes / time from the first start to the last exit), p50/p99 pull wall,
where a fleet pull's time goes (the ready markers' timings), and requests per node.
Every node must end warm with the exact files.

    .venv/bin/python bench/fleet.py [--nodes 48] [--rounds 3] [--blob-mb 8]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from factories import tree as installed_files  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from pull import WRAPPER, marker_of  # noqa: E402
from servers import (  # noqa: E402
    BUCKET,
    FAKE_AWS_ENV,
    create_bucket,
    s3_options,
    start_seaweedfs,
    stop_process,
)
from synthetic import publish_synthetic, random_files  # noqa: E402

from torchwarm.stores import StoreOptions, open_store  # noqa: E402

MiB = 1 << 20
# The split of a pull, as bench/pull.py prints it; `rest` includes opening the store
# (boto3's import and client) and `exit` the wait for the worker's exit.
SPLIT = ("start", "fingerprint", "resolve", "fetch", "install", "rest", "exit")
WORKLOAD = {"name": "fleet", "model": "torchwarm.models:mlp", "inputs": [[{"shape": [1, 8]}]]}


def write_config(path: Path, prefix: str, endpoint: str, chunk: int) -> Path:
    doc = {
        "store": f"s3://{BUCKET}/{prefix}",
        "store_options": {
            "endpoint_url": endpoint,
            "path_style": True,
            "region": "us-east-1",
            "request_checksum_calculation": "when_required",
            "chunk_size": chunk,
        },  # fmt: skip
        "cache_dir": str(path.parent / "unused" / "inductor"),
        "workloads": [WORKLOAD],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def fleet(config: Path, dirs: list[Path], files: dict[str, bytes]) -> dict[str, Any]:
    """Start one pull per dir at once; return walls, the span, the CPU seconds of all
    pulls (their processes' user + sys) and the markers' timings."""
    env = {**os.environ, **FAKE_AWS_ENV}
    walls: list[float] = [0.0] * len(dirs)
    ends: list[float] = [0.0] * len(dirs)
    process_start: list[float] = [0.0] * len(dirs)  # spawn to the CLI's STARTED clock
    errors: list[str] = []
    go = threading.Barrier(len(dirs))

    def one(i: int) -> None:
        cmd = [sys.executable, "-c", WRAPPER, "pull", "-c", str(config), "--require",
               "--cache-dir", str(dirs[i])]  # fmt: skip
        go.wait()
        begun = time.monotonic()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        ends[i] = time.monotonic()
        walls[i] = ends[i] - begun
        if proc.returncode != 0:
            errors.append(proc.stderr.strip().splitlines()[-1])
        clock = re.search(r"^bench-clock (\S+) ", proc.stderr, re.M)
        process_start[i] = float(clock[1]) - begun if clock else float("nan")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(dirs))]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    span = max(ends) - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if errors:
        sys.exit(f"{len(errors)} pull(s) failed, e.g.: {errors[0]}")
    timings: dict[str, list[float]] = defaultdict(list)
    for i, d in enumerate(dirs):
        if installed_files(d) != files:
            sys.exit(f"{d}: the installed files differ from the published ones")
        for k, v in marker_of(d)["timings"].items():
            timings[k.split(".")[0]].append(v)
        timings["start_s"].append(process_start[i])
    return {"walls": walls, "span": span, "cpu": cpu, "timings": timings}


def add(into: dict[str, list[float]], got: dict[str, Any]) -> dict[str, Any]:
    """Append a fleet's per-pull figures to `into`: wall, CPU and each split step."""
    into["wall"] += got["walls"]
    into["cpu"].append(got["cpu"] / len(got["walls"]))
    t = got["timings"]
    for i in range(len(got["walls"])):
        steps = {k: t[f"{k}_s"][i] for k in ("fingerprint", "resolve", "fetch", "install")}
        into["start"].append(t["start_s"][i])
        into["rest"].append(t["total_s"][i] - sum(steps.values()))
        into["exit"].append(got["walls"][i] - t["start_s"][i] - t["total_s"][i])
        for k, v in steps.items():
            into[k].append(v)
    return got


def p(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=48, help="pulls started at once")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--alone", type=int, default=3, help="single pulls per round")
    ap.add_argument("--blob-mb", type=float, default=8.0, help="the cache's blob size")
    ap.add_argument("--chunk-mb", type=int, default=StoreOptions().chunk_size // MiB,
                    help="store_options.chunk_size (bytes per ranged GET)")  # fmt: skip
    a = ap.parse_args()
    os.environ.update(FAKE_AWS_ENV)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        os.environ.pop(name, None)
    chunk = a.chunk_mb * MiB
    with tempfile.TemporaryDirectory(prefix="torchwarm-bench-fleet-") as tmp:
        work = Path(tmp)
        proc, endpoint = start_seaweedfs(work / "seaweedfs")
        proxy = FaultProxy(int(endpoint.rsplit(":", 1)[1]))
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        try:
            create_bucket(endpoint, BUCKET)
            prefix = f"fleet-{uuid.uuid4().hex[:8]}"
            store = open_store(f"s3://{BUCKET}/{prefix}", s3_options(endpoint))
            cache = publish_synthetic(store, work / "seed", random_files(int(a.blob_mb * MiB)),
                                      WORKLOAD["name"], FAKE_AWS_ENV)  # fmt: skip
            direct = write_config(work / "direct.yaml", prefix, endpoint, chunk)
            proxied = write_config(work / "proxied.yaml", prefix, proxy.endpoint, chunk)
            runs: dict[str, dict[str, list[float]]] = {
                "alone": defaultdict(list), "fleet": defaultdict(list)}  # fmt: skip
            rates: list[float] = []
            n = 0
            for r in range(a.rounds):
                for _ in range(a.alone):
                    n += 1
                    add(runs["alone"], fleet(direct, [work / f"n{n}" / "inductor"], cache.files))
                dirs = [work / f"r{r}-{i}" / "inductor" for i in range(a.nodes)]
                got = add(runs["fleet"], fleet(direct, dirs, cache.files))
                rates.append(a.nodes / got["span"])
                print(f"round {r + 1}/{a.rounds}: {a.nodes} pulls in {got['span']:.2f} s "
                      f"({rates[-1]:.1f}/s), p50 {statistics.median(got['walls']):.2f} s, "
                      f"max {max(got['walls']):.2f} s, CPU {got['cpu'] / a.nodes:.2f} s per "
                      f"pull; alone {statistics.median(runs['alone']['wall'][-a.alone:]):.3f} s",
                      flush=True)  # fmt: skip
            proxy.reset()
            fleet(proxied, [work / f"x-{i}" / "inductor" for i in range(a.nodes)], cache.files)
            answers = list(proxy.answers)
        finally:
            proxy.shutdown()
            proxy.server_close()
            stop_process(proc)

    size = cache.blob_size
    kinds = Counter(
        (m, "manifest" if "/manifests/" in path else "blob" if "/blobs/" in path else path, s)
        for m, path, s, _ in answers
    )
    ranges = -(-size // chunk)
    print(f"\n{a.nodes} nodes at once, {a.rounds} round(s), SeaweedFS on loopback, blob "
          f"{size / MiB:.2f} MiB ({ranges} range(s) of {a.chunk_mb} MiB), seconds:")  # fmt: skip
    fl, al = runs["fleet"], runs["alone"]
    print(f"  pulls/s                  {statistics.median(rates):.1f} "
          f"[{min(rates):.1f}-{max(rates):.1f}]")  # fmt: skip
    print(f"  pull wall p50 / p99      {statistics.median(fl['wall']):.3f} / "
          f"{p(fl['wall'], 99):.3f} (max {max(fl['wall']):.3f}); one pull alone: "
          f"{statistics.median(al['wall']):.3f}")  # fmt: skip
    print(f"  CPU per pull (user+sys)  {statistics.median(fl['cpu']):.3f} at once, "
          f"{statistics.median(al['cpu']):.3f} alone")  # fmt: skip
    print(f"  {'split (medians)':24} " + " ".join(f"{k:>11}" for k in SPLIT))
    for name, got in (("alone", al), ("at once", fl)):
        print(f"  {name:24} " + " ".join(f"{statistics.median(got[k]):11.3f}" for k in SPLIT))
    per_node = sum(kinds.values()) / a.nodes
    print(
        f"  requests per node        {per_node:g} (expected 1 manifest GET + {ranges} blob "
        f"GET(s)): " + ", ".join(f"{m} {k} {s}: {c}" for (m, k, s), c in sorted(kinds.items()))
    )
    return 0 if per_node == 1 + ranges else 1


if __name__ == "__main__":
    sys.exit(main())
