"""GPU check (#11): the example transformer on CUDA, compile modes "default" and
"reduce-overhead", through seed → local-folder store → fresh node, for every capture
format; one table of first-call seconds and the node's hit counters.

Warm-ups of all (mode, format) cells run in parallel (independent processes with their
own cache dirs); probes then run one at a time, each in a new process:
    cold        empty cache dir (one per mode)
    node        empty cache dir, then a pull from the format's local-folder store; the
                app runs with TORCH_CACHING_PRECOMPILE=1 where the pull installed
                precompiled entries (bench/nodes.py)
    local-warm  the node's cache dir again, without precompile (the FX-graph path)
A failing cell prints its error in the table and the rest go on; cells not reached
within --budget-s are marked skipped. Only the local-folder store is used, so nothing
cloud-related is imported. Run it through bench/gpu.sh on the GPU machine; here:
    python bench/gpu.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from nodes import ROOT, CommandFailed, counters_line, probe, pull, torchwarm

FORMATS = ("cachedir", "megacache", "precompile")
MODES = ("default", "reduce-overhead")
TINY = {"vocab": 64, "d": 32, "heads": 2, "blocks": 1}  # --tiny: a CPU run in about a minute


@dataclass
class Cell:
    mode: str
    fmt: str
    warmup_s: float | None = None
    node_s: float | None = None
    load_s: float | None = None  # of node_s: torch.compile(), where precompile loads
    local_warm_s: float | None = None
    counters: str = ""
    note: str = ""
    ok: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def workload(self) -> str:
        return workload_name(self.mode)

    def fail(self, what: str, e: BaseException) -> None:
        self.ok = False
        msg = str(e).strip().splitlines()[-1:] or [type(e).__name__]
        self.note = f"{what} failed: {msg[0]}"[:200]


def workload_name(mode: str) -> str:
    return f"transformer-{mode}"


def write_config(path: Path, device: str, modes: list[str], tiny: bool) -> Path:
    base = yaml.safe_load((ROOT / "configs" / "transformer.yaml").read_text())["workloads"][0]
    kwargs = TINY if tiny else base["model_kwargs"]
    inputs = [
        [{**t, "high": min(t.get("high", 2), kwargs["vocab"])} for t in s] for s in base["inputs"]
    ]
    doc = {
        "store": str(path.parent / "unused-store"),
        "cache_dir": str(path.parent / "unused-cache"),
        "workloads": [
            {
                "name": workload_name(m),
                "model": base["model"],
                "model_kwargs": kwargs,
                "device": device,
                "mode": "inference",
                "compile": {"mode": m},
                "inputs": inputs,
            }
            for m in modes
        ],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (to test this script)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--tiny", action="store_true", help="a one-block d=32 model (script test)")
    ap.add_argument("--jobs", type=int, default=0, help="parallel warm-ups (default: all)")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="no new probe after this many seconds (default: 300)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="write gpu-table.txt, gpu.json here")
    a = ap.parse_args()
    t0 = time.monotonic()
    modes, fmts = a.modes.split(","), a.formats.split(",")
    work = Path(tempfile.mkdtemp(prefix="torchwarm-gpu-"))
    cfg = str(write_config(work / "gpu.yaml", a.device, modes, a.tiny))
    print(f"config {cfg}, device {a.device}, modes {modes}, formats {fmts}", flush=True)
    env_line = environment()
    print(env_line, flush=True)
    cells = [Cell(m, f) for m in modes for f in fmts]
    stores = {f: {"TORCHWARM_STORE": (work / f"store-{f}").as_uri(), "TORCHWARM_FORMAT": f}
              for f in fmts}  # fmt: skip
    jobs = a.jobs or len(cells)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))

    def warm(cell: Cell) -> None:
        start = time.monotonic()
        env = {**stores[cell.fmt], "TORCHINDUCTOR_COMPILE_THREADS": threads}
        try:
            torchwarm("warmup", "-c", cfg, "--workload", cell.workload, "--push", env=env)
            cell.warmup_s = time.monotonic() - start
            print(f"[{cell.mode} {cell.fmt}] warmed in {cell.warmup_s:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - one cell's failure is reported, not fatal
            cell.fail("warm-up", e)
            print(f"[{cell.mode} {cell.fmt}] {cell.note}", flush=True)

    print(f"warming {len(cells)} cells, {jobs} at a time …", flush=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(warm, cells))

    cold: dict[str, float | str] = {}
    for mode in modes:
        if time.monotonic() - t0 > a.budget_s:
            cold[mode] = "skipped"
            continue
        empty = work / f"cold-{mode}" / "inductor"
        try:
            cold[mode] = probe(cfg, empty, workload_name(mode))["first_call_s"]
            print(f"[{mode}] cold {cold[mode]:.2f} s", flush=True)
        except Exception as e:  # noqa: BLE001
            cold[mode] = f"failed: {str(e).splitlines()[-1:]}"
            print(f"[{mode}] cold probe {cold[mode]}", flush=True)
        shutil.rmtree(empty.parent, ignore_errors=True)
    for cell in cells:
        if not cell.ok:
            continue
        if time.monotonic() - t0 > a.budget_s:
            cell.note, cell.ok = f"skipped: over the {a.budget_s:g} s budget", False
            continue
        node_cell(cfg, work, cell, stores[cell.fmt])
        print(f"[{cell.mode} {cell.fmt}] node {fmt_s(cell.node_s)}, local-warm "
              f"{fmt_s(cell.local_warm_s)}; {cell.counters} {cell.note}", flush=True)  # fmt: skip

    table = render(cells, cold, env_line, time.monotonic() - t0)
    print("\n" + table, flush=True)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "gpu-table.txt").write_text(table + "\n")
        doc = {"cold": cold, "cells": [c.__dict__ for c in cells], "env": env_line}
        (a.out / "gpu.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(c.ok for c in cells) else 1


def node_cell(cfg: str, work: Path, cell: Cell, env: dict[str, str]) -> None:
    node = work / f"node-{cell.mode}-{cell.fmt}" / "inductor"
    step = "pull"
    try:
        got = pull(cfg, cell.workload, node, env=env)
        if cell.fmt == "precompile":
            left_out = f"entries left out: {got['reason']}"
            cell.note = "precompiled" if got["precompiled"] else left_out
        step = "node probe"
        r = probe(cfg, node, cell.workload, env=got["app_env"])
        cell.node_s, cell.counters = r["first_call_s"], counters_line(r["counters"])
        cell.load_s = r.get("compile_s")
        cell.extra["node_max_abs_diff"] = max(s["max_abs_diff"] for s in r["input_sets"])
        step = "local-warm probe"
        cell.local_warm_s = probe(cfg, node, cell.workload)["first_call_s"]
    except CommandFailed as e:
        cell.fail(step, e)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        cell.fail(step, e)


def fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s"


def render(cells: list[Cell], cold: dict[str, Any], env_line: str, wall: float) -> str:
    head = ("| mode | format | cold | node after pull | of which load | local-warm | "
            "node / local-warm | "
            "node counters (dynamo, fxgraph, aot hit/miss) | max diff | note |")  # fmt: skip
    lines = [f"{env_line}; seconds of torch.compile() + the first call of every input set "
             f"(compile included, imports excluded); {wall:.0f} s in all", "", head,
             "|" + "---|" * 10]  # fmt: skip
    for c in cells:
        cd = cold.get(c.mode)
        cold_s = f"{cd:.2f} s" if isinstance(cd, float) else str(cd)
        ratio = (f"{c.node_s / c.local_warm_s:.3f}" if c.node_s is not None and c.local_warm_s
                 else "-")  # fmt: skip
        diff = c.extra.get("node_max_abs_diff")
        lines.append(
            f"| {c.mode} | {c.fmt} | {cold_s} | {fmt_s(c.node_s)} | {fmt_s(c.load_s)} | "
            f"{fmt_s(c.local_warm_s)} | "
            f"{ratio} | {c.counters or '-'} | {'-' if diff is None else f'{diff:.1e}'} | "
            f"{c.note} |"
        )
    return "\n".join(lines)


def environment() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        return (f"python {sys.version.split()[0]}, torch {torch.__version__}, "
                f"cuda {torch.version.cuda}, {gpu}")  # fmt: skip
    except Exception as e:  # noqa: BLE001
        return f"torch unavailable: {e}"


if __name__ == "__main__":
    sys.exit(main())
