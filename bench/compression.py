"""zstd vs gzip for cache archives: size, seed-side compress time, node-side unpack time.

Warms up a workload (default: configs/transformer.yaml, the larger example) into a
fresh cache dir with `torchwarm warmup --out`, then packs the same tar both ways and
times each side by side, best of 5. The node pays decompression on every boot.
Usage: python bench/compression.py [-c CONFIG]
"""

from __future__ import annotations

import argparse
import gzip
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parent.parent


def best(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default=str(ROOT / "configs" / "transformer.yaml"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="torchwarm-zbench-") as tmp:
        out = Path(tmp)
        proc = subprocess.run(
            [sys.executable, "-m", "torchwarm.cli", "warmup", "-c", a.config, "--out", str(out),
             "--format", "cachedir"],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            sys.exit(proc.stderr.strip())
        (archive,) = out.glob("*/cachedir.tar.zst")
        raw = zstandard.ZstdDecompressor().stream_reader(archive.read_bytes()).read()
    print(f"cache tar: {len(raw) / 1e6:.2f} MB uncompressed ({archive.parent.name})")
    print(f"{'codec':10} {'size MB':>8} {'ratio':>6} {'pack s':>7} {'unpack s':>9}")
    rows = {
        "gzip-6": (lambda: gzip.compress(raw, 6), gzip.decompress),
        "zstd-3": (lambda: zstandard.ZstdCompressor(level=3).compress(raw), None),
        "zstd-10": (lambda: zstandard.ZstdCompressor(level=10).compress(raw), None),
        "zstd-19": (lambda: zstandard.ZstdCompressor(level=19).compress(raw), None),
    }
    results = {}
    for name, (pack, unpack) in rows.items():
        blob = pack()
        dec = unpack or (lambda b: zstandard.ZstdDecompressor().stream_reader(io.BytesIO(b)).read())
        assert dec(blob) == raw
        results[name] = (len(blob), best(pack, 3), best(lambda b=blob, d=dec: d(b)))
        size, p, u = results[name]
        print(f"{name:10} {size / 1e6:8.2f} {len(raw) / size:6.2f} {p:7.3f} {u:9.4f}")
    g, z = results["gzip-6"], results["zstd-10"]
    print(f"\nzstd-10 vs gzip-6: {g[0] / z[0]:.2f}x smaller, unpacks {g[2] / z[2]:.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
