"""GB-scale pulls: `torchwarm pull` beside the shell one-liner and a plain copy (issue #18).

Builds a made-up compile cache shaped like a GPU LLM server's Triton cache: kernel
folders `triton/0/<32 hex>/`, each with kernel.{cubin,ptx,json,llir,ttir,ttgir} of seeded
sizes, made of 2 KiB of random bytes alternating with 2 KiB of IR-like text (about 2x
compressible by zstd). It is captured as `cachedir` and published with torchwarm's own
code (the format's capture and unpacked_bytes, build_manifest, publish) for this
machine's fingerprint, read by `torchwarm fingerprint --json` in a new process
(tests/synthetic.py), to two stores: a local folder and SeaweedFS on loopback
(tests/servers.py). The tree, its local store and SeaweedFS's data stay in --work, keyed
by size, so that a rerun only republishes the manifest (remove --work to free the space).
Free space is checked first: a size that does not fit is left out, saying so, and the
largest that fits runs. --quick is a smoke run of 128 MiB / 1,500 files (`make bench`).
Then, per size and store, --rounds rounds, each running these in rotating order, each
into a fresh empty folder on --work's filesystem, wall seconds including durability:
  torchwarm pull  `torchwarm pull --require` in a new process, its config's cache_dir
                  the empty folder, started by a small launcher that times it and reads
                  the peak RSS of its process tree (wait4's ru_maxrss, which covers the
                  forked worker); the installed tree must equal the source
                  (names and sizes of every file, the bytes of 200 seeded ones); its
                  durability is its own (no sync after it)
  hand-rolled     local: `tar -I zstd -xf <the blob file in the store>` + `sync`;
                  SeaweedFS: `s5cmd cp` of the blob to a file, the same tar, `sync`
                  (verifies nothing)
  plain copy      `cp -r` of the source tree + `sync`
Between two measurements, untimed: the destinations and the temp blob removed, `sync`,
1 s of sleep, so that one measurement's writeback does not land in the next. The page
cache is not dropped (a shared machine): the source tree and the blob may be read from
memory, by all three alike. Prints per size and store a markdown table of medians (and
the runs) against the issue's goals, and the blob size (compressed bytes per node).

    .venv/bin/python bench/scale.py [--sizes 1:12000,4:50000] [--rounds 3] [--quick]
                                    [--stores local,seaweedfs] [--work /var/tmp/torchwarm-scale]
                                    [--s3-option KEY=VALUE ...]  (store_options of the S3 pulls)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from servers import (  # noqa: E402
    AWS_ENV_TO_HIDE,
    BUCKET,
    FAKE_AWS_ENV,
    create_bucket,
    s3_options,
    start_seaweedfs,
    stop_process,
)
from synthetic import node_fingerprint  # noqa: E402

from torchwarm import formats  # noqa: E402
from torchwarm.formats import Captured  # noqa: E402
from torchwarm.seed.publish import build_manifest, publish  # noqa: E402
from torchwarm.spec import archive, keys  # noqa: E402
from torchwarm.spec.manifest import Manifest  # noqa: E402
from torchwarm.stores import Store, StoreOptions, open_store  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
GOAL_VS_HAND, GOAL_VS_COPY, GOAL_RSS_MIB = 0.8, 1.1, 128  # issue #18
WORKLOAD = {"name": "scale", "model": "torchwarm.models:mlp", "inputs": [[{"shape": [1, 8]}]]}
# A Triton kernel folder's files and their share of the folder's bytes.
KINDS = (("cubin", 0.30), ("ptx", 0.25), ("llir", 0.20), ("ttgir", 0.12), ("ttir", 0.12),
         ("json", 0.01))  # fmt: skip
BLOCK = 2 * KiB
_IR = (
    b"  %17 = tt.load %16, %15 {cache = 1 : i32, evict = 1 : i32} : tensor<128x64xf16>\n"
    b"  %18 = tt.dot %17, %12, %cst : tensor<128x64xf16> * tensor<64x128xf16>\n"
    b"  %19 = arith.addi %arg9, %c64_i32 : i32 loc(#loc12)\n"
)
IR_BLOCK = (_IR * (BLOCK // len(_IR) + 1))[:BLOCK]
GENERATOR = 1  # bump when the tree's recipe changes: cached trees are rebuilt
METHODS = ("torchwarm pull", "hand-rolled", "plain copy")
SAMPLE = 200  # files compared byte by byte after each pull


@dataclass(frozen=True)
class Size:
    gib: float
    files: int

    @property
    def key(self) -> str:
        return f"{self.gib:g}g-{self.files}"

    @property
    def label(self) -> str:
        amount = f"{self.gib:g} GiB" if self.gib >= 1 else f"{self.gib * 1024:g} MiB"
        return f"{amount}, {self.files:,} files"


@dataclass(frozen=True)
class Cache:
    """A generated tree and its capture, published to the local store in `store`."""

    size: Size
    tree: Path
    store: Path  # the local store's folder
    sha256: str
    blob_size: int
    unpacked: int  # the manifest's unpacked_bytes (the node's free-space check)
    listing: dict[str, int]  # member name -> size

    @property
    def blob_file(self) -> Path:
        return self.store / keys.blob_key(self.sha256)


def parse_sizes(text: str) -> list[Size]:
    sizes = []
    for part in text.split(","):
        gib, _, files = part.partition(":")
        try:
            sizes.append(Size(float(gib), int(files)))
        except ValueError:
            sys.exit(f"--sizes {text!r}: write GiB:files pairs separated by commas, as 1:12000")
        if sizes[-1].gib <= 0 or sizes[-1].files < 1:
            sys.exit(f"--sizes {text!r}: sizes and file counts must be positive")
    return sorted(sizes, key=lambda s: s.gib)


# -- the made-up cache ------------------------------------------------------------------


def content(rng: random.Random, size: int) -> bytes:
    """`size` bytes: 2 KiB of random bytes, 2 KiB of IR text, and so on."""
    blocks = -(-size // BLOCK)
    rand = memoryview(rng.randbytes((blocks + 1) // 2 * BLOCK))
    parts = [rand[b // 2 * BLOCK : (b // 2 + 1) * BLOCK] if b % 2 == 0 else IR_BLOCK
             for b in range(blocks)]  # fmt: skip
    return b"".join(parts)[:size]


def generate(tree: Path, size: Size) -> None:
    """`size.files` files of about `size.gib` GiB together, in kernel folders of six."""
    rng = random.Random(f"torchwarm-scale-{size.key}")
    per_folder = size.gib * GiB * len(KINDS) / size.files
    folder = tree
    for i in range(size.files):
        ext, share = KINDS[i % len(KINDS)]
        if i % len(KINDS) == 0:
            folder = tree / "triton" / "0" / f"{rng.getrandbits(128):032x}"
            folder.mkdir(parents=True)
        n = max(1, int(per_folder * share * rng.uniform(0.5, 1.5)))
        (folder / f"kernel.{ext}").write_bytes(content(rng, n))


def listing(root: Path) -> dict[str, int]:
    """Every file under `root`: relative name -> size."""
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = os.stat(p).st_size
    return out


def prepare(work: Path, size: Size) -> Cache:
    """The cache of `size`, from --work, or generated, captured and published to its local
    store (the blob then lives only there)."""
    home = work / size.key
    meta_file = home / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    if meta.get("generator") != GENERATOR:
        shutil.rmtree(home, ignore_errors=True)
        print(f"{size.label}: generating the tree in {home / 'tree'}", flush=True)
        t0 = time.perf_counter()
        generate(home / "tree", size)
        fmt = formats.get("cachedir")
        print(f"  {time.perf_counter() - t0:.0f} s; capturing (zstd level "
              f"{archive.ZSTD_LEVEL})", flush=True)  # fmt: skip
        t0 = time.perf_counter()
        (home / "capture").mkdir()
        caps = fmt.capture(home / "tree", home / "capture")
        meta = {"generator": GENERATOR, "unpacked": fmt.unpacked_bytes(home / "tree")}
        m = publish_to(open_store((home / "store").as_uri()), caps, meta["unpacked"])
        (blob,) = m.blobs
        meta.update(sha256=blob.sha256, blob_size=blob.size)
        shutil.rmtree(home / "capture")
        tmp = meta_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, meta_file)
        print(f"  {time.perf_counter() - t0:.0f} s; blob {blob.size / MiB:.0f} MiB", flush=True)
    return Cache(size, home / "tree", home / "store", meta["sha256"], meta["blob_size"],
                 meta["unpacked"], listing(home / "tree"))  # fmt: skip


def publish_to(store: Store, caps: list[Captured], unpacked: int) -> Manifest:
    """Publish `caps` for this machine's fingerprint with the seed's warmup fields."""
    summary = {"synthetic": True, "unpacked_bytes": unpacked}
    m, files = build_manifest(WORKLOAD["name"], node_fingerprint(FAKE_AWS_ENV), "cachedir",
                              caps, summary)  # fmt: skip
    return publish(store, m, files).manifest


def republish(cache: Cache, store: Store) -> None:
    """The manifest written again for this machine's fingerprint (the blob is skipped where
    the store holds it)."""
    caps = [Captured("cachedir", cache.blob_file, archive.MEDIA_TYPE)]
    publish_to(store, caps, cache.unpacked)


def fits(work: Path, sizes: list[Size]) -> list[Size]:
    """The sizes whose trees, stores and one measurement fit the free space of --work,
    the largest dropped first; says so when one does not fit."""
    free = shutil.disk_usage(work).free
    while sizes:
        # Not yet in --work: the tree, the capture and its copy in the local store, and
        # SeaweedFS's copy (~T/2 each, 2x compressible). Each measurement then needs a
        # tree and a downloaded blob at most, one at a time.
        new = [s for s in sizes if not (work / s.key / "meta.json").exists()]
        need = sum(2.5 * s.gib * GiB for s in new) + 1.5 * sizes[-1].gib * GiB + GiB
        if need <= free:
            return sizes
        print(f"{sizes[-1].label} does not fit: about {need / GiB:.1f} GiB needed, "
              f"{free / GiB:.1f} GiB free in {work}; running the largest that fits",
              flush=True)  # fmt: skip
        sizes = sizes[:-1]
    sys.exit(f"no size fits in {work} ({free / GiB:.1f} GiB free); choose another --work")


# -- one measurement each ---------------------------------------------------------------


def sh(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")


def torchwarm_cmd() -> list[str]:
    script = Path(sys.executable).parent / "torchwarm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "torchwarm.cli"]


# Starts the pull and reaps it with wait4, whose ru_maxrss covers the child and the
# descendants it waited for (the pull's worker). A small process of its own, because a
# child forked from this one counts this process's pages (shared until its exec) in its
# peak: the pull's figure read directly was twice /usr/bin/time's.
LAUNCHER = """\
import os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{time.perf_counter() - t0} {usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def pull(config: Path, log: Path) -> tuple[float, float]:
    """Run the pull; return its wall seconds and the peak RSS of its process tree in MiB."""
    cmd = [*torchwarm_cmd(), "pull", "-c", str(config), "--require"]
    figures = log.with_suffix(".rss")
    with log.open("wb") as out:
        proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(figures), *cmd],
                              stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"torchwarm pull exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    wall, kib = figures.read_text().split()
    return float(wall), int(kib) / 1024


def check_tree(cache: Cache, got: Path, what: str, sample: bool) -> None:
    """`got` holds exactly the source's files by name and size (and, with `sample`, the
    same bytes in 200 seeded ones)."""
    have = listing(got)
    if have != cache.listing:
        missing, extra = cache.listing.keys() - have.keys(), have.keys() - cache.listing.keys()
        sys.exit(f"{what}: {got} differs from the source: {len(have)} files, "
                 f"{sum(have.values())} bytes against {len(cache.listing)} files, "
                 f"{sum(cache.listing.values())} bytes; missing e.g. {sorted(missing)[:3]}, "
                 f"extra e.g. {sorted(extra)[:3]}")  # fmt: skip
    if sample:
        rng = random.Random(f"sample-{cache.size.key}")
        for rel in rng.sample(sorted(cache.listing), min(SAMPLE, len(cache.listing))):
            if (got / rel).read_bytes() != (cache.tree / rel).read_bytes():
                sys.exit(f"{what}: {got / rel} differs from the source's bytes")


@dataclass(frozen=True)
class Target:
    """One store: how a pull reaches it and how the hand-rolled path fetches its blob."""

    name: str
    store_doc: dict  # the config's store and store_options
    fetch: Callable[[Cache, Path], Path] | None  # blob into a temp file; None: read in place


def measure(method: str, cache: Cache, target: Target, run_dir: Path, n: int) -> tuple:
    """Time `method` into a fresh folder; return (seconds, peak RSS MiB or None)."""
    dest = run_dir / f"{n}"
    dest.mkdir(parents=True)
    rss = None
    if method == "torchwarm pull":
        config = run_dir / f"{n}.yaml"
        config.write_text(yaml.safe_dump({**target.store_doc, "cache_dir": str(dest / "inductor"),
                                          "workloads": [WORKLOAD]}))  # fmt: skip
        wall, rss = pull(config, run_dir / f"{n}.log")
        check_tree(cache, dest / "inductor", f"{target.name} pull", sample=True)
    elif method == "hand-rolled":
        t0 = time.perf_counter()
        blob = target.fetch(cache, run_dir / f"{n}.blob") if target.fetch else cache.blob_file
        sh("tar", "-I", "zstd", "-C", str(dest), "-xf", str(blob))
        sh("sync")
        wall = time.perf_counter() - t0
        check_tree(cache, dest, f"{target.name} hand-rolled", sample=False)
    else:
        t0 = time.perf_counter()
        sh("cp", "-r", str(cache.tree), str(dest / "tree"))
        sh("sync")
        wall = time.perf_counter() - t0
        check_tree(cache, dest / "tree", "plain copy", sample=False)
    # Untimed: this measurement's files gone and written back before the next one starts.
    shutil.rmtree(run_dir)
    run_dir.mkdir()
    os.sync()
    time.sleep(1)
    return wall, rss


def rounds(cache: Cache, target: Target, work: Path, n_rounds: int) -> dict[str, list]:
    runs: dict[str, list] = {m: [] for m in (*METHODS, "rss")}
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    os.sync()  # the generated tree or a publish written back before the first one
    time.sleep(1)
    for r in range(n_rounds):
        order = METHODS[r % 3 :] + METHODS[: r % 3]
        line = []
        for i, method in enumerate(order):
            wall, rss = measure(method, cache, target, run_dir, r * 3 + i)
            runs[method].append(wall)
            if rss is not None:
                runs["rss"].append(rss)
            line.append(f"{method} {wall:.2f} s" + (f" ({rss:.0f} MiB)" if rss else ""))
        print(f"  {cache.size.label} / {target.name}, round {r + 1}/{n_rounds}: "
              + ", ".join(line), flush=True)  # fmt: skip
    shutil.rmtree(run_dir)
    return runs


# -- the stores -------------------------------------------------------------------------


def local_target(cache: Cache) -> Target:
    republish(cache, open_store(cache.store.as_uri()))
    return Target("local folder", {"store": cache.store.as_uri()}, None)


def seaweedfs_target(cache: Cache, endpoint: str, extra: dict[str, object]) -> Target:
    """The SeaweedFS store of `cache`; `extra`: more store_options for the pulls."""
    prefix = f"scale-{cache.size.key}"
    republish(cache, open_store(f"s3://{BUCKET}/{prefix}", s3_options(endpoint)))
    s5cmd = shutil.which("s5cmd") or str(Path(sys.executable).parent / "s5cmd")

    def fetch(c: Cache, to: Path) -> Path:
        sh(s5cmd, "--endpoint-url", endpoint, "cp",
           f"s3://{BUCKET}/{prefix}/{keys.blob_key(c.sha256)}", str(to))  # fmt: skip
        return to

    doc = {
        "store": f"s3://{BUCKET}/{prefix}",
        "store_options": {
            "endpoint_url": endpoint,
            "path_style": True,
            "region": "us-east-1",
            "request_checksum_calculation": "when_required",
            **extra,
        },
    }
    shown = ", ".join(f"{k}={v}" for k, v in extra.items())
    return Target(f"SeaweedFS (S3{', ' + shown if shown else ''})", doc, fetch)


# -- the report -------------------------------------------------------------------------


def cell(xs: list[float]) -> str:
    runs = ", ".join(f"{x:.2f}" for x in xs)
    return f"{statistics.median(xs):.2f} s ({runs})"


def goal(value: float, limit: float, text: str) -> str:
    return f"{text} ({'met' if value <= limit else 'not met'})"


def report(results: list[tuple[Cache, Target, dict[str, list]]], n_rounds: int) -> None:
    print(f"\n### GB-scale pull: medians of {n_rounds} round(s), the runs in brackets, peak RSS "
          f"the largest of the rounds; goals (issue #18): pull ÷ hand-rolled ≤ {GOAL_VS_HAND}, "
          f"pull ÷ copy ≤ {GOAL_VS_COPY}, peak RSS ≤ {GOAL_RSS_MIB} MiB\n")  # fmt: skip
    print("| cache | store | torchwarm pull | hand-rolled | plain copy | pull ÷ hand-rolled "
          "| pull ÷ copy | pull peak RSS |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for cache, target, runs in results:
        pull_s, hand_s, copy_s = (statistics.median(runs[m]) for m in METHODS)
        rss = max(runs["rss"])
        print(f"| {cache.size.label} | {target.name} | {cell(runs['torchwarm pull'])} | "
              f"{cell(runs['hand-rolled'])} | {cell(runs['plain copy'])} | "
              f"{goal(pull_s / hand_s, GOAL_VS_HAND, f'{pull_s / hand_s:.2f}')} | "
              f"{goal(pull_s / copy_s, GOAL_VS_COPY, f'{pull_s / copy_s:.2f}')} | "
              f"{goal(rss, GOAL_RSS_MIB, f'{rss:.0f} MiB')} |")  # fmt: skip
    chunk = StoreOptions().download_chunk_size
    print(f"\nblobs (compressed bytes per node; ranged GETs at the default download_chunk_size of "
          f"{chunk // MiB} MiB):")  # fmt: skip
    seen = set()
    for cache, _, _ in results:
        if cache.size in seen:
            continue
        seen.add(cache.size)
        print(f"  {cache.size.label}: blob {cache.blob_size:,} bytes "
              f"({cache.blob_size / MiB:.1f} MiB), unpacked {cache.unpacked:,} bytes "
              f"({cache.unpacked / cache.blob_size:.2f}x), {-(-cache.blob_size // chunk)} "
              f"ranged GET(s)")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1:12000,4:50000", help="GiB:files, comma-separated")
    ap.add_argument("--quick", action="store_true", help="a smoke run: --sizes 0.125:1500")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stores", default="local,seaweedfs", help="local, seaweedfs or both")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/torchwarm-scale"),
                    help="trees, stores and destinations (kept between runs)")  # fmt: skip
    ap.add_argument("--s3-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a store_options entry for the SeaweedFS pulls, e.g. concurrency=4 "
                    "or download_chunk_size=16777216 (repeatable)")  # fmt: skip
    a = ap.parse_args()
    extra: dict[str, object] = {}
    for item in a.s3_option:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--s3-option {item!r}: expected KEY=VALUE")
        extra[key] = yaml.safe_load(value)
    stores = a.stores.split(",")
    if not stores or set(stores) - {"local", "seaweedfs"} or a.rounds < 1:
        sys.exit("--stores takes local, seaweedfs or both; --rounds at least 1")
    os.environ.update(FAKE_AWS_ENV)
    for name in AWS_ENV_TO_HIDE:
        os.environ.pop(name, None)
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    sizes = fits(work, parse_sizes("0.125:1500" if a.quick else a.sizes))
    print(f"{os.cpu_count()} CPUs; work dir {work} "
          f"({shutil.disk_usage(work).free / GiB:.0f} GiB free)", flush=True)  # fmt: skip
    caches = [prepare(work, s) for s in sizes]
    results = []
    weed = None
    try:
        if "seaweedfs" in stores:
            weed, endpoint = start_seaweedfs(work / "seaweedfs")
            create_bucket(endpoint, BUCKET)
            print(f"SeaweedFS at {endpoint}, data in {work / 'seaweedfs'}", flush=True)
        for cache in caches:
            if "local" in stores:
                results.append((cache, t := local_target(cache), rounds(cache, t, work, a.rounds)))
            if weed is not None:
                t = seaweedfs_target(cache, endpoint, extra)
                results.append((cache, t, rounds(cache, t, work, a.rounds)))
    finally:
        if weed is not None:
            stop_process(weed)
    report(results, a.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
