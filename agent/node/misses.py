"""Misses proven in production: compile entries the app writes into the cache dir after the pull.

A cache can be installed and still miss (another shape or dtype, another compile option,
changed code). torch then compiles and writes new entries into the cache dir, so the
sidecar takes a baseline of the entries right after the pull and, every few seconds,
counts the entries that were not there: each one is a compile the warm-up did not cover.

What torch 2.13 writes into the cache dir (measured on CPU, fresh processes; README
"Miss metrics"; the names are compat.py's):
- on a hit, through the FX-graph, AOTAutograd or precompiled Dynamo cache: lock files
  (`locks/<key>.lock`) and nothing else with format cachedir or precompile; with format
  megacache also the output code (`<xx>/<key>.py`) and kernel sources (`.cpp`) that the
  mega-cache does not carry. None of these counts.
- on a miss: an FX-graph entry (`fxgraph/<xx>/<key>/<entry>`), an AOTAutograd entry
  (`aotautograd/<key>/<entry>`), the output code, and a CPU kernel
  (`<xx>/<key>.main.so` with its `.main.cpp`) unless an identical kernel already exists.
  Files in flight are hidden (`.<pid>.<tid>.tmp`, torch's write_atomic) or under `tmp.*`
  folders (Triton, torch's Triton bundler).
- precompiled Dynamo entries (`dynamo/<key>/entry`) are written only when the app calls
  `torch.compiler.save_cache_artifacts()` in precompile mode: a new one is a function the
  warm-up did not capture. Dynamo's profiles (`dynamo/code_state_*.pkl`) are not entries.
- Triton kernels (GPU; seen once on an H200 with the same MLP): Triton keeps one
  `__grp__<name>.json` per compiled kernel under `triton/<device>/<hash>/`. A hit on a
  copied cache dir writes nothing there; a miss writes a folder per new kernel (and
  autotuning's `<xx>/<hash>.best_config`). torch's Triton bundler also writes those
  folders on an FX-graph *hit* when they are missing, which is the case after a megacache
  install (its kernels travel inside the FX-graph entries: the first hit wrote all six),
  so Triton kernels are not counted when a warm workload was installed from a megacache.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from torchwarm.env import compat
from torchwarm.env.compat import AOTAUTOGRAD_DIR, DYNAMO_DIR, FXGRAPH_DIR, TRITON_DIR
from torchwarm.errors import one_line, printable
from torchwarm.node.report import PullReport

POLL_S = 5.0  # seconds between scans, at least
MAX_DUTY = 0.01  # a slow scan stretches the interval: the watcher uses at most 1 % of a core
FIRST_SCAN_WAIT_S = 5.0  # how long /readyz may wait for the baseline scan


@dataclass(frozen=True)
class Kind:
    name: str  # the `kind` label
    what: str  # what the app did
    todo: str  # what to do about it


KINDS = (
    Kind("fxgraph", "the app compiled a graph the warm-up did not cover (FX-graph cache miss)",
         "add the input set the app used (shapes, dtypes, dynamic dims) or its compile "
         "options to the workload, then re-run the seed"),
    Kind("aotautograd", "the app traced a graph through AOTAutograd that the warm-up did not "
         "cover (AOTAutograd cache miss)",
         "add the input set or mode (inference, train) the app used to the workload, then "
         "re-run the seed"),
    Kind("dynamo", "the app saved a precompiled Dynamo entry for a function the warm-up did "
         "not capture", "compile that function in a workload with format precompile"),
    Kind("cpu_kernel", "the app compiled a CPU kernel (.so) that the warm-up did not leave",
         "add the input set the app used to the workload; if its graphs hit, the compiler "
         "command line differs: run seed, agent and app from one image with one compile "
         "environment"),
    Kind("triton_kernel", "the app compiled a Triton kernel that the warm-up did not leave",
         "add the input set the app used to the workload; run the seed on the app's GPU model"),
)  # fmt: skip
_KIND = {k.name: k for k in KINDS}
_ORDER = {k.name: i for i, k in enumerate(KINDS)}  # lines in this order within one scan
_ENTRY_DIRS = {FXGRAPH_DIR, AOTAUTOGRAD_DIR, DYNAMO_DIR, TRITON_DIR}


def _transient(parts: list[str]) -> bool:
    return (
        parts[0] == compat.LOCKS_DIR
        or any(p.startswith(compat.IN_FLIGHT_PREFIXES) for p in parts)
        or parts[-1].endswith(compat.TRANSIENT_SUFFIXES)
    )


def classify(rel: str) -> str | None:
    """The kind of compile entry at `rel` (a file path relative to the cache dir), or None
    for anything that is not one: locks, files in flight, output code, sources, profiles."""
    parts = rel.split("/")
    if _transient(parts):
        return None
    top, name = parts[0], parts[-1]
    if top in (FXGRAPH_DIR, AOTAUTOGRAD_DIR) and len(parts) >= 3:
        return top
    if top == DYNAMO_DIR and compat.DYNAMO_ENTRY.fullmatch(rel):
        return "dynamo"
    if top == TRITON_DIR and compat.TRITON_KERNEL.fullmatch(name):
        return "triton_kernel"
    if len(parts) == 2 and len(top) == 2 and name.endswith(compat.CPU_KERNEL_SUFFIX):
        return "cpu_kernel"
    return None


def descend(rel_dir: str) -> bool:
    """Whether a folder (relative to the cache dir) can hold entries: what a scan visits."""
    parts = rel_dir.split("/")
    if _transient(parts):
        return False
    return parts[0] in _ENTRY_DIRS or (len(parts) == 1 and len(parts[0]) == 2)


def counted_kinds(formats: Iterable[str]) -> tuple[str, ...]:
    """The kinds that prove a miss, given the formats the warm workloads were installed from."""
    if "megacache" in set(formats):
        return tuple(k.name for k in KINDS if k.name != "triton_kernel")
    return tuple(k.name for k in KINDS)


def scan(root: Path) -> dict[str, str]:
    """Every entry under `root` (relative path → kind); {} when `root` does not exist."""
    found: dict[str, str] = {}

    def walk(path: str, rel: str) -> None:
        try:
            it = os.scandir(path)
        except FileNotFoundError:
            return  # gone meanwhile (a temp folder), or no cache dir yet
        with it:
            for e in it:
                sub = f"{rel}/{e.name}" if rel else e.name
                if e.is_dir(follow_symlinks=False):
                    if descend(sub):
                        walk(e.path, sub)
                elif (kind := classify(sub)) is not None:
                    found[sub] = kind

    walk(str(root), "")
    return found


class Watcher:
    """Counts, per kind, the entries that appear in a cache dir after its baseline scan,
    and says one line for the first entry of each kind. Runs in a daemon thread; any
    error stops it with one line, never the caller."""

    def __init__(
        self,
        cache_dir: Path,
        kinds: Iterable[str] = tuple(k.name for k in KINDS),
        note: str = "",
        say: Callable[[str], None] = lambda line: print(printable(line), flush=True),
        interval_s: float = POLL_S,
    ) -> None:
        self.cache_dir = cache_dir
        self.kinds = tuple(kinds)
        self.note = note  # appended to each line (e.g. which workloads started cold)
        self.say = say
        self.interval_s = interval_s
        self.counts = dict.fromkeys(self.kinds, 0)
        self.scans = 0
        self.scan_s = 0.0  # the last scan's duration
        self.up = False
        self.baselined = threading.Event()
        self._seen: set[str] = set()
        self._said: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self, wait_s: float = FIRST_SCAN_WAIT_S) -> Watcher:
        """Start watching; return once the baseline is taken, or after `wait_s` at most."""
        self.up = True
        threading.Thread(target=self._run, name="torchwarm-misses", daemon=True).start()
        self.baselined.wait(wait_s)
        return self

    def stop(self) -> None:
        self._stop.set()

    def snapshot(self) -> tuple[dict[str, int], int, float, bool]:
        """(counts per kind, scans done, last scan seconds, watching) for /metrics."""
        with self._lock:
            return dict(self.counts), self.scans, self.scan_s, self.up

    def baseline(self) -> None:
        self._seen = set(self._timed_scan())
        self.baselined.set()

    def poll(self) -> None:
        """One scan: count the entries not seen before, say a line per new kind."""
        found = self._timed_scan()
        new = [rel for rel in found if rel not in self._seen]
        for rel in sorted(new, key=lambda r: (_ORDER[found[r]], r)):
            kind = found[rel]
            self._seen.add(rel)
            if kind not in self.counts:
                continue
            with self._lock:
                self.counts[kind] += 1
            if kind not in self._said:
                self._said.add(kind)
                self.say(self.line(kind, rel))

    def line(self, kind: str, rel: str) -> str:
        k = _KIND[kind]
        return (
            f"miss ({kind}): {k.what}: {rel} in {self.cache_dir}; {k.todo}{self.note}; "
            f'counted in torchwarm_cache_misses_total{{kind="{kind}"}}'
        )

    def _timed_scan(self) -> dict[str, str]:
        t0 = time.perf_counter()
        found = scan(self.cache_dir)
        with self._lock:
            self.scans += 1
            self.scan_s = time.perf_counter() - t0
        return found

    def _run(self) -> None:
        try:
            self.baseline()
            while not self._stop.wait(max(self.interval_s, self.scan_s / MAX_DUTY)):
                self.poll()
        except Exception as e:  # noqa: BLE001 - watching is best effort, serving is not
            with contextlib.suppress(Exception):  # the log itself may be what failed
                self.say(f"miss watcher stopped: {one_line(f'{type(e).__name__}: {e}')}; the "
                         "counts so far stay on /metrics (torchwarm_miss_watch_up 0)")  # fmt: skip
        finally:
            self.up = False
            self.baselined.set()


def watch(report: PullReport, interval_s: float = POLL_S) -> Watcher | None:
    """Watch the cache dir a pull installed into (None when the pull had none)."""
    if not report.cache_dir:
        return None
    cold = [o.workload for o in report.workloads if o.status != "warm"]
    note = ""
    if cold:
        note = f" (the pull left {', '.join(cold)} cold: each of their compiles is a miss)"
    elif report.status != "warm":
        note = " (the pull installed nothing: every compile is a miss)"
    kinds = counted_kinds(o.format for o in report.workloads if o.status == "warm")
    return Watcher(Path(report.cache_dir), kinds, note, interval_s=interval_s).start()
