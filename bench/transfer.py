"""Transfer benchmark: torchwarm's S3 store vs s5cmd vs boto3 defaults, side by side.

Starts its own SeaweedFS on loopback ports (as the tests do), then times, each
`--rounds` times in interleaved order (median reported):
  pull   256 MB blob: torchwarm download() / `s5cmd cp` / boto3 download_file
  push   the same file: torchwarm put() of its path / `s5cmd cp` / boto3 upload_file
  re-push of unchanged content: torchwarm exists-check (bytes sent must be 0)
and, with --crossover, single GET vs parallel ranged GETs for sizes 1..128 MiB.

    .venv/bin/python bench/transfer.py [--size-mb 256] [--rounds 3] [--crossover]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import boto3

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from servers import (  # noqa: E402
    BUCKET,
    FAKE_AWS_ENV,
    create_bucket,
    s3_options,
    start_seaweedfs,
    stop_process,
)

from torchwarm.stores import StoreOptions, open_store  # noqa: E402

MiB = 1 << 20


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def s5cmd(endpoint: str, *args: str) -> None:
    exe = shutil.which("s5cmd") or str(Path(sys.executable).parent / "s5cmd")
    subprocess.run([exe, "--endpoint-url", endpoint, *args], check=True, capture_output=True)


def median_table(results: dict[str, list[float]], size: int) -> dict[str, float]:
    medians = {name: statistics.median(ts) for name, ts in results.items()}
    for name, t in medians.items():
        runs = ", ".join(f"{x:.2f}" for x in results[name])
        print(f"  {name:<28} {t:6.2f} s  {size / MiB / t:7.0f} MiB/s   (runs: {runs})")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--crossover", action="store_true")
    args = parser.parse_args()
    os.environ.update(FAKE_AWS_ENV)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        os.environ.pop(name, None)

    work = Path(tempfile.mkdtemp(prefix="torchwarm-bench-"))
    proc, endpoint = start_seaweedfs(work / "seaweedfs")
    try:
        create_bucket(endpoint, BUCKET)
        run(work, endpoint, args.size_mb * MiB, args.rounds, args.crossover)
    finally:
        stop_process(proc)
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, endpoint: str, size: int, rounds: int, crossover: bool) -> None:
    options = s3_options(endpoint)
    store = open_store(f"s3://{BUCKET}/bench", options)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    src = work / "blob"
    with src.open("wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    key = f"blobs/{digest}"
    s3_key = f"bench/{key}"
    store.put(key, src)
    print(f"SeaweedFS at {endpoint}; blob {size / MiB:.0f} MiB; {os.cpu_count()} CPUs")
    print(f"torchwarm: chunk {options.chunk_size // MiB} MiB x {options.concurrency} parallel")

    def tw_pull() -> None:
        with (work / "tw.out").open("wb") as f:
            assert store.download(key, f) == size

    pulls: dict[str, Callable[[], None]] = {
        "torchwarm download": tw_pull,
        "s5cmd cp": lambda: s5cmd(endpoint, "cp", f"s3://{BUCKET}/{s3_key}", str(work / "s5.out")),
        "boto3 download_file": lambda: client.download_file(BUCKET, s3_key, str(work / "b3.out")),
    }
    pushes: dict[str, Callable[[], None]] = {
        "torchwarm put": lambda: store.put("push/tw", src),
        "s5cmd cp": lambda: s5cmd(endpoint, "cp", str(src), f"s3://{BUCKET}/bench/push/s5"),
        "boto3 upload_file": lambda: client.upload_file(str(src), BUCKET, "bench/push/b3"),
    }
    for title, ops in (("pull", pulls), ("push", pushes)):
        results: dict[str, list[float]] = {name: [] for name in ops}
        for _ in range(rounds):
            for name, op in ops.items():
                results[name].append(timed(op))
        print(f"\n{title} ({rounds} rounds, median):")
        med = median_table(results, size)
        base = med[next(iter(ops))]
        for name in list(ops)[1:]:
            print(f"  ratio {name} / torchwarm: {med[name] / base:.2f}")
    for out in ("tw.out", "s5.out", "b3.out"):
        assert hashlib.sha256((work / out).read_bytes()).hexdigest() == digest, out

    # Re-push of unchanged content: content-addressed key, so an exists-check skips it.
    sent = 0

    def repush() -> None:
        nonlocal sent
        if not store.exists(key):
            store.put(key, src)
            sent += size

    t = timed(repush)
    print(f"\nre-push unchanged (exists-check): {t * 1000:.1f} ms, {sent} bytes uploaded")

    if crossover:
        measure_crossover(work, endpoint, options, rounds)


def measure_crossover(work: Path, endpoint: str, options: StoreOptions, rounds: int) -> None:
    """Single GET vs parallel ranged GETs (8 MiB x 8) per object size."""
    single = open_store(f"s3://{BUCKET}/x", replace(options, chunk_size=1 << 30))
    parallel = open_store(f"s3://{BUCKET}/x", replace(options, chunk_size=8 * MiB))
    print("\ncrossover: single GET vs 8 MiB ranges x 8 (median ms)")
    for mib in (4, 8, 16, 32, 64, 128):
        single.put(f"c{mib}", os.urandom(mib * MiB))
        times: dict[str, list[float]] = {"single": [], "parallel": []}
        for _ in range(rounds):
            for name, st in (("single", single), ("parallel", parallel)):
                start = time.perf_counter()
                with (work / "c.out").open("wb") as f:
                    st.download(f"c{mib}", f)
                times[name].append(time.perf_counter() - start)
        s, p = (statistics.median(times[n]) * 1000 for n in ("single", "parallel"))
        print(f"  {mib:4d} MiB: single {s:7.1f}  parallel {p:7.1f}  ratio {s / p:.2f}")


if __name__ == "__main__":
    main()
