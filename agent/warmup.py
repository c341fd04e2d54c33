"""Warm-up: compile a workload in a fresh cache dir, in its own subprocess, and capture it.

A subprocess per workload keeps captures from mixing (torch's mega-cache saves are
cumulative per process) and gives every warm-up an empty cache dir, so the capture
holds exactly what the workload needs. The child runs `python -m torchwarm.warmup`,
gets its workload as JSON (never the config, nor any TORCHWARM_* variable: it runs the
user's model code and must hold no signing key), and runs in a process group of its
own, killed whole when the warm-up passes its timeout (command.py).

Output folder layout (what `torchwarm push --from DIR` reads):
    DIR/<workload>/warmup.json   fingerprint, counters, timings, captured blob files
    DIR/<workload>/<blob files>  as the format named them
    DIR/<workload>/warmup.log    the child's output
    DIR/<workload>/cache/        the warmed cache dir itself, as the child left it
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import command, fingerprint, formats, manifest, torchenv
from . import config as cfgmod
from .config import Config, Workload
from .errors import Cancelled, ConfigError, TorchwarmError, WarmupError
from .formats import Captured

RESULT = "warmup.json"


@dataclass
class WarmupResult:
    workload: str
    format: str
    fingerprint: dict[str, Any]
    summary: dict[str, Any]  # goes into the manifest's "warmup" field
    captured: list[Captured]

    def save(self, out_dir: Path) -> None:
        doc = asdict(self)
        doc["captured"] = [
            {"role": c.role, "file": c.path.name, "media_type": c.media_type} for c in self.captured
        ]
        (out_dir / RESULT).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, out_dir: Path) -> WarmupResult:
        path = out_dir / RESULT
        try:
            doc = json.loads(path.read_text())
            captured = [
                Captured(c["role"], out_dir / c["file"], c["media_type"]) for c in doc["captured"]
            ]
            return cls(doc["workload"], doc["format"], doc["fingerprint"], doc["summary"], captured)
        except FileNotFoundError:
            raise WarmupError(
                f"{path} does not exist; run `torchwarm warmup --out` first"
            ) from None
        except (ValueError, KeyError, TypeError) as e:
            raise WarmupError(
                f"{path} is not a warm-up result ({e}); run the warm-up again"
            ) from None


def warmup_key(w: Workload, fmt: str, fingerprint_digest: str) -> str:
    """What decides whether a stored warm-up is still current: the workload's config, the
    source of the module that defines its model, the capture format and the environment.

    The seed daemon skips a workload whose manifest carries this key. Only the factory's
    own module file is hashed: a change in a module it imports needs a config change
    (or a new torch, which changes the fingerprint) to be noticed.
    """
    workload = asdict(w)
    del workload["warmup_timeout_s"]  # how long it may take does not change what it compiles
    doc = {
        "workload": workload,
        "model_source_sha256": _model_source_digest(w.model),
        "format": fmt,
        "fingerprint": fingerprint_digest,
        "torchwarm_format_version": manifest.FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _model_source_digest(spec: str) -> str:
    module = spec.partition(":")[0]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"model {spec!r}: cannot find module {module!r}: {e}") from None
    if found is None or not found.origin or not Path(found.origin).is_file():
        raise ConfigError(f"model {spec!r}: module {module!r} has no source file to hash")
    return hashlib.sha256(Path(found.origin).read_bytes()).hexdigest()


def warmup(
    cfg: Config,
    w: Workload,
    out_dir: Path,
    stop: threading.Event | None = None,
    on_capture: Callable[[], None] | None = None,
) -> WarmupResult:
    """Warm `w` up in a child process with an empty cache dir and capture it into `out_dir`.

    The child runs in a process group of its own. Past `w.warmup_timeout_s` the group (the
    child and whatever it started) is killed and WarmupError says so; with `stop`, setting
    it kills the group and raises Cancelled. `on_capture()` is called when the child has
    exited well, before the capture.
    """
    fmt = formats.get(cfg.format)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cache = out_dir / "cache"
    cache.mkdir(parents=True)
    log_path = out_dir / "warmup.log"
    cmd = [
        sys.executable, "-m", "torchwarm.warmup", "--workload-json", json.dumps(asdict(w)),
        "--format", fmt.name, "--out", str(out_dir),
    ]  # fmt: skip
    ended = command.run(f"workload {w.name!r}", cmd, child_env(cache), log_path,
                        w.warmup_timeout_s, stop=stop)  # fmt: skip
    if ended.how != "exited" or ended.returncode != 0:
        shutil.rmtree(cache, ignore_errors=True)  # the log stays: the error names it
    if ended.how == "cancelled":
        raise Cancelled(f"warm-up of {w.name!r} cancelled")
    if ended.how == "timeout":
        raise WarmupError(
            f"warm-up of {w.name!r} did not finish within {w.warmup_timeout_s:g} s "
            f"(warmup_timeout_s); killed it and its child processes; last output: "
            f"{command.last_line(log_path)} (full log: {log_path})"
        )
    if ended.returncode != 0:
        raise WarmupError(
            f"warm-up of {w.name!r} failed (exit {ended.returncode}): "
            f"{command.last_line(log_path)} (full log: {log_path})"
        )
    if on_capture is not None:
        on_capture()
    child = json.loads((out_dir / "child.json").read_text())
    captured = fmt.capture(cache, out_dir)
    unpacked = sum((cache / m).stat().st_size for m in formats.cache_members(cache))
    summary = {
        **fmt.manifest_fields(w, out_dir),
        "mode": w.mode,
        "device": w.device,
        "compile": w.compile.as_kwargs(),
        "input_sets": [
            [{"shape": list(t.shape), "dtype": t.dtype, "dynamic": list(t.dynamic)} for t in s]
            for s in w.inputs
        ],
        "counters": child["report"]["counters"],
        "first_call_s": round(child["report"]["first_call_s"], 3),
        "so_files": child["report"]["new_so_files"],
        "unpacked_bytes": unpacked,  # what a node needs free to install it (pulljob._space)
        "warmup_key": warmup_key(w, fmt.name, fingerprint.digest(child["fingerprint"])),
    }
    result = WarmupResult(w.name, fmt.name, child["fingerprint"], summary, captured)
    result.save(out_dir)
    return result


def child_env(cache: Path) -> dict[str, str]:
    """The warm-up child's environment: this process's, torch's caches in `cache`, and no
    TORCHWARM_* variable.

    The child runs the user's model code, so it must hold no signing key: not
    $TORCHWARM_SIGNING_KEY, nor $TORCHWARM_SIGNING_KEY_FILE or the config file that would
    lead to one. It gets its workload as JSON on the command line instead.
    """
    env = torchenv.cache_env(cache)
    return {k: v for k, v in env.items() if not k.startswith("TORCHWARM_")}


def _child(argv: list[str]) -> int:
    """Runs in the warm-up subprocess, with TORCHINDUCTOR_CACHE_DIR set by the parent."""
    p = argparse.ArgumentParser(prog="python -m torchwarm.warmup")
    p.add_argument("--workload-json", required=True, help="the workload, as warmup() wrote it")
    p.add_argument("--format", required=True)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    from . import workload

    try:
        w = cfgmod.parse_workload(json.loads(a.workload_json), "--workload-json")
        fmt = formats.get(a.format)
        fmt.prepare_in_process(w, a.out)
        report = workload.run(w)  # first: its first-call time is the honest cold figure
        fields = fingerprint.collect()
        fmt.save_in_process(w, a.out)
    except TorchwarmError as e:
        print(f"torchwarm: error: {e}", file=sys.stderr)
        return e.exit_code
    doc = {"fingerprint": fields, "report": report.to_dict()}
    (a.out / "child.json").write_text(json.dumps(doc, indent=2))
    print(json.dumps({"first_call_s": report.first_call_s, "counters": report.counters}))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
