"""The canary: a `precompile` capture's Dynamo entries are published only once a fresh
process has loaded them and computed right with them.

torch loads an entry inside torch.compile() (docs/precompile.md) and may fail there in a
way that kills the app. Seen on torch 2.13: a `forward` wrapped by a decorator that reads
the wrapped function's `__name__` (as transformers' models are) is saved with that
function replaced by a placeholder, and rebuilding its guards in a new process raises
`AttributeError: '_Missing' object has no attribute '__name__'` out of torch.compile().
So after the capture, check() installs the captured blobs into a scratch cache dir as a
node would (entries included) and runs the same workload there with
TORCH_CACHING_PRECOMPILE=1:
  - a model workload in `python -m torchwarm.seed.canary`, which compiles and calls it as
    the warm-up child does (child.run). It passes when it exits 0, torch counted a
    Dynamo-cache hit and no load error, and every input set's output is as close to
    eager as the seed's own compile was (MAX_DIFF);
  - a command workload as itself, with the hook (seed/hook/). It passes when it exits 0,
    no process's hook line counts a load error and at least one counts a Dynamo-cache
    hit (a launcher that compiles nothing beside a worker that loads); the command checks
    its own outputs (an app that compares with eager, as the examples do, exits non-zero
    when they differ).
Otherwise the entries are dropped (formats.precompile.drop_entries): the capture is
published without them and the manifest says why (warmup.precompile.entries: dropped,
entries_reason), so a node installs the FX-graph part only and says so.

A command workload gets here with only its precompile run done; check() first does for
it what the model child does in-process (formats.precompile save_in_process): a second
run without precompile mode into the same cache (the AOTAutograd entries a node without
the entries looks up), then its state (formats.precompile.record_command).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from torchwarm import config
from torchwarm.config import Config, Workload
from torchwarm.errors import Cancelled, TorchwarmError, WarmupError
from torchwarm.formats import Captured, Format, precompile
from torchwarm.node import precompile_rules
from torchwarm.seed import child, hook, kinds, processes
from torchwarm.util import fs

log = logging.getLogger(__name__)

DIR = "canary"  # in the warm-up out dir: its log (warmup.log) and result, kept for a look
FALLBACK_DIR = "fallback"  # a command's run without precompile: its log
# How far a loaded entry's output may be from eager: twice the seed's own compile's
# distance (the same kernels give the same numbers), and never less than this.
MAX_DIFF = 1e-4
_TAIL_BYTES = 1 << 16


def check(
    cfg: Config,
    w: Workload,
    fmt: Format,
    ran: kinds.Ran,
    captured: list[Captured],
    stop: threading.Event | None = None,
) -> list[Captured]:
    """After the capture of `w` (the warm-up `ran`): for a precompile capture, load its
    entries in a fresh process and keep them only if that passes; the capture to
    publish (recaptured when something changed). Other formats: `captured` as it is.

    WarmupError when a command's second run fails; Cancelled when `stop` is set.
    """
    if fmt.name != precompile_rules.FORMAT:
        return captured
    cache, out_dir = ran.cache, ran.out_dir
    if not kinds.of(w).saves_in_process:  # a command: its second run and state, see above
        captured = _finish_command(cfg, w, fmt, ran, stop)
    if precompile.read_state(out_dir).get("entries") != precompile.DROPPED:
        t0 = time.perf_counter()
        reason, summary = _trial(cfg, w, fmt, captured, out_dir, stop)
        summary["wall_s"] = round(time.perf_counter() - t0, 3)
        precompile.record_canary(out_dir, reason is None, summary)
        if reason is not None:
            log.warning("workload %r: precompiled entries dropped: %s", w.name, reason)
            precompile.drop_entries(cache, out_dir, reason)
    if precompile.read_state(out_dir).get("entries") == precompile.DROPPED:
        captured = fmt.capture(cache, out_dir)  # with an empty dynamo blob
    return captured


def _finish_command(
    cfg: Config, w: Workload, fmt: Format, ran: kinds.Ran, stop: threading.Event | None
) -> list[Captured]:
    where = ran.out_dir / FALLBACK_DIR
    where.mkdir(exist_ok=True)
    so_before = child.count_so(ran.cache)
    again = kinds.run(cfg, w, "cachedir", ran.cache, where, stop=stop, doing="second run")
    reported = processes.read_report(again.log) or {}
    fallback = {
        "counters": reported.get("counters"),  # as the command reported them, if it did
        "first_call_s": reported.get("first_call_s"),
        "so_files": child.count_so(ran.cache) - so_before,
        "wall_s": round(again.ended.wall_s, 3),
    }
    precompile.record_command(w, ran.cache, ran.out_dir, fallback)
    return fmt.capture(ran.cache, ran.out_dir)


def _trial(
    cfg: Config,
    w: Workload,
    fmt: Format,
    captured: list[Captured],
    out_dir: Path,
    stop: threading.Event | None,
) -> tuple[str | None, dict[str, Any]]:
    """Run the canary on a node-like install of `captured`: (why it failed or None, what
    it saw)."""
    scratch = out_dir / DIR
    shutil.rmtree(scratch, ignore_errors=True)
    copy = scratch / "cache"
    copy.mkdir(parents=True)
    try:
        fmt.install({c.role: c.path for c in captured}, copy, precompiled=True)
        if kinds.of(w).saves_in_process:
            return _model_trial(cfg, w, copy, scratch, out_dir, stop)
        return _command_trial(cfg, w, copy, scratch, stop)
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def _model_trial(
    cfg: Config,
    w: Workload,
    copy: Path,
    scratch: Path,
    out_dir: Path,
    stop: threading.Event | None,
) -> tuple[str | None, dict[str, Any]]:
    env = processes.child_env(copy, cfg.env)
    env[precompile_rules.ENV_VAR] = "1"  # child_env leaves it out: here it is the point
    result, log_path = scratch / "result.json", scratch / kinds.LOG
    argv = (sys.executable, "-m", "torchwarm.seed.canary", "--workload-json",
            json.dumps(config.workload_doc(w)), "--out", str(result))  # fmt: skip
    ended = processes.run(f"workload {w.name!r}", argv, env, log_path, w.warmup_timeout_s,
                          stop=stop)  # fmt: skip
    if ended.how == "cancelled":
        raise Cancelled(f"canary of {w.name!r} cancelled")
    if ended.how == "timeout":
        return f"a fresh process loading them ran past {w.warmup_timeout_s:g} s", {}
    if ended.returncode != 0:
        return (
            f"a fresh process loading them failed (exit {ended.returncode}): "
            f"{_last_words(log_path)}",
            {},
        )
    report = json.loads(result.read_text())
    counters = report["counters"]
    diffs = [s["max_abs_diff"] for s in report["input_sets"]]
    summary = {"counters": counters, "max_abs_diff": diffs}
    if (why := _not_loaded(counters)) is not None:
        return why, summary
    seed = json.loads((out_dir / kinds.CHILD_RESULT).read_text())["report"]["input_sets"]
    for i, (got, made) in enumerate(zip(diffs, (s["max_abs_diff"] for s in seed), strict=True)):
        if not got <= max(2 * made, MAX_DIFF):  # `not <=`: a NaN fails too
            return (
                f"input set {i}: a fresh process loading them computed outputs {got:.3g} "
                f"away from eager (the seed's own compile: {made:.3g})",
                summary,
            )
    return None, summary


def _command_trial(
    cfg: Config, w: Workload, copy: Path, scratch: Path, stop: threading.Event | None
) -> tuple[str | None, dict[str, Any]]:
    try:
        ran = kinds.run(cfg, w, precompile_rules.FORMAT, copy, scratch, stop=stop,
                        doing="canary")  # fmt: skip
    except WarmupError as e:
        log.warning("%s", e)
        return (
            f"a fresh run of the command loading them failed: {_last_words(scratch / kinds.LOG)}",
            {},
        )
    lines = hook.read_lines(ran.log)
    if not lines:
        return "a fresh run of the command printed no torchwarm_hook line (torch not imported?)", {}
    total = {k: sum(c.get(k, 0) for c in lines) for k in sorted({k for c in lines for k in c})}
    summary = {"counters": total, "processes": lines}
    # Every process counts: a launcher's zeros do not hide a worker's hit, and one
    # worker's load error is not hidden by another's hit.
    for i, counters in enumerate(lines):
        if counters.get("dynamo_cache_error", 0):
            why = _not_loaded(counters)
            return f"process {i + 1} of {len(lines)} (in exit order): {why}", summary
    if not any(c.get("dynamo_cache_hit", 0) >= 1 for c in lines):
        return f"{_not_loaded(total)}, in none of its {len(lines)} processes", summary
    return None, summary


def _not_loaded(counters: dict[str, int]) -> str | None:
    hit, error = counters.get("dynamo_cache_hit", 0), counters.get("dynamo_cache_error", 0)
    if hit < 1 or error:
        return (
            f"a fresh process did not load them (dynamo_cache_hit {hit}, "
            f"dynamo_cache_error {error}, dynamo_cache_miss {counters.get('dynamo_cache_miss', 0)})"
        )
    return None


def _last_words(log_path: Path) -> str:
    """The last line of a log that is not the hook's own line (which a crashing process
    still prints at exit): the error, for a traceback."""
    with log_path.open("rb") as f:
        f.seek(max(0, f.seek(0, 2) - _TAIL_BYTES))
        lines = f.read().decode(errors="replace").splitlines()
    said = [line.strip() for line in lines if line.strip() and hook.LINE_KEY not in line]
    return said[-1][:300] if said else "(no output)"


def _child(argv: list[str]) -> int:
    """A model workload's canary process: TORCHINDUCTOR_CACHE_DIR and
    TORCH_CACHING_PRECOMPILE are set by the parent (_model_trial)."""
    p = argparse.ArgumentParser(prog="python -m torchwarm.seed.canary")
    p.add_argument("--workload-json", required=True)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    try:
        w = config.parse_workload(json.loads(a.workload_json), "--workload-json")
        report = child.run(w)
    except TorchwarmError as e:
        print(f"torchwarm: error: {e}", file=sys.stderr)
        return e.exit_code
    fs.atomic_write_bytes(a.out, json.dumps(report.to_dict()).encode())
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
