"""The cost of a pinned -march: steady-state ms/iter of the example transformer compiled
with torch's default (-march=native) and with TORCHINDUCTOR_CPP_MARCH=x86-64-v3.

Why it matters: under -march=native the fingerprint's `cpu` field is exact (vendor,
family, model, every extension), so only identical CPUs share a seed; under a pinned
march it is the target and torch's vector flags, so a mixed CPU pool can share one.

Each variant runs in its own processes with its own cache dir; rounds interleave the
variants (the first round compiles, later ones start from their own warm cache). In
each process: torch.compile(), `--warmup` calls, then `--blocks` blocks of `--iters`
calls under no_grad; a process reports its fastest block's ms/iter (on a shared machine
other work only ever adds time, and with two threads a preempted one stalls both) and
its median block's, and its CPU share (CPU time / (wall x threads), median over blocks:
near 1 when it had its cores; spin-waiting threads count as busy). The bench prints, per
variant, the median over rounds of each, the ratios, the compiler flags torch used, and
the fingerprint's `cpu` field.

    .venv/bin/python bench/march.py [-c configs/transformer.yaml] [--batch 8] [--seq 128]
        [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"native (default)": None, "x86-64-v3 (pinned)": "x86-64-v3"}


def child(a: argparse.Namespace) -> None:
    """In a fresh process: compile, warm up, time; print one JSON line."""
    import torch
    from torch._inductor.cpp_builder import _get_cpu_arch_cflags, get_cpp_compiler
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    from torchwarm import config as cfgmod
    from torchwarm.env import fingerprint
    from torchwarm.seed import child as workload

    w = cfgmod.load(a.config).workloads[0]
    model = workload.build(w)
    vocab = int(w.model_kwargs.get("vocab", 1000))
    tokens = torch.randint(0, vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    so_before = workload.count_so(workload.cache_dir())
    compiled = torch.compile(model)
    blocks: list[float] = []
    shares: list[float] = []  # CPU time / (wall x threads): below 1, others took the cores
    with torch.no_grad():
        start = time.perf_counter()
        out = compiled(tokens)
        first = time.perf_counter() - start
        diff = (out - model(tokens)).abs().max().item()
        for _ in range(a.warmup):
            compiled(tokens)
        for _ in range(a.blocks):
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(a.iters):
                compiled(tokens)
            wall = time.perf_counter() - start
            blocks.append(wall / a.iters * 1000)
            shares.append((time.process_time() - cpu) / (wall * torch.get_num_threads()))
    isa = pick_vec_isa()
    print(json.dumps({
        "ms_per_iter": min(blocks),
        "median_ms_per_iter": statistics.median(blocks),
        "cpu_share": statistics.median(shares),
        "blocks": blocks,
        "first_call_s": first,
        "max_abs_diff": diff,
        "new_so_files": workload.count_so(workload.cache_dir()) - so_before,
        "flags": " ".join(_get_cpu_arch_cflags(get_cpp_compiler())
                          + isa.build_arch_flags().split()),
        "threads": torch.get_num_threads(),
        "fingerprint_cpu": fingerprint.collect()["cpu"],
    }))  # fmt: skip


def run(a: argparse.Namespace, march: str | None, cache_dir: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CPP_MARCH"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    if march:
        env["TORCHINDUCTOR_CPP_MARCH"] = march
    cmd = [sys.executable, __file__, "--child", "-c", a.config, "--batch", str(a.batch),
           "--seq", str(a.seq), "--warmup", str(a.warmup), "--blocks", str(a.blocks),
           "--iters", str(a.iters)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"the {march or 'native'} run failed:\n{proc.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default=str(ROOT / "configs" / "transformer.yaml"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS (0: torch's default)")
    ap.add_argument("--warmup", type=int, default=10, help="calls before timing")
    ap.add_argument("--blocks", type=int, default=15, help="timed blocks per process")
    ap.add_argument("--iters", type=int, default=3, help="calls per block")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return 0
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="torchwarm-bench-march-") as tmp:
        for r in range(a.rounds):
            order = list(VARIANTS.items())
            if r % 2:
                order.reverse()  # neither variant always runs right after a compile
            line = []
            for name, march in order:
                got = run(a, march, Path(tmp) / (march or "native"))
                results[name].append(got)
                line.append(f"{name} {got['ms_per_iter']:.1f} ms/iter (CPU share "
                            f"{got['cpu_share']:.2f}, {got['new_so_files']} kernels "
                            "compiled)")  # fmt: skip
            print(f"round {r + 1}/{a.rounds}: " + ", ".join(line), flush=True)
    print(f"\n{Path(a.config).name} model, batch {a.batch} x {a.seq} tokens, no_grad, "
          f"{results[next(iter(VARIANTS))][0]['threads']} threads; median of {a.rounds} "
          f"processes, ms/iter of each process's fastest and median block of {a.iters} "
          f"calls ({a.blocks} blocks):")  # fmt: skip
    best, typical = {}, {}
    for name, runs in results.items():
        ms = [g["ms_per_iter"] for g in runs]
        best[name] = statistics.median(ms)
        typical[name] = statistics.median(g["median_ms_per_iter"] for g in runs)
        share = statistics.median(g["cpu_share"] for g in runs)
        print(f"  {name:20} fastest {best[name]:7.1f} [{min(ms):.1f}-{max(ms):.1f}]  median "
              f"{typical[name]:7.1f}  CPU share {share:.2f}"
              f"  max |compiled - eager| {max(g['max_abs_diff'] for g in runs):.1e}")  # fmt: skip
    (n_best, p_best), (n_typ, p_typ) = best.values(), typical.values()
    print(f"  pinned / native      fastest {p_best / n_best:7.3f}            median "
          f"{p_typ / n_typ:7.3f}")  # fmt: skip
    for name, runs in results.items():
        print(f"\n{name}:\n  compiler flags   {runs[0]['flags']}\n"
              f"  fingerprint cpu  {json.dumps(runs[0]['fingerprint_cpu'])}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
