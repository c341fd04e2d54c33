"""Warm-up: compile a workload in a fresh cache dir, in its own subprocess, and capture it.

A subprocess per workload keeps captures from mixing (torch's mega-cache saves are
cumulative per process) and gives every warm-up an empty cache dir, so the capture
holds exactly what the workload needs. The child runs `python -m torchwarm.warmup`.

Output folder layout (what `torchwarm push --from DIR` reads):
    DIR/<workload>/warmup.json   fingerprint, counters, timings, captured blob files
    DIR/<workload>/<blob files>  as the format named them
    DIR/<workload>/warmup.log    the child's output
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import config as cfgmod
from . import fingerprint, formats, manifest, torchenv
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
    doc = {
        "workload": asdict(w),
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
    cfg: Config, w: Workload, out_dir: Path, stop: threading.Event | None = None
) -> WarmupResult:
    """Warm `w` up in a child process with an empty cache dir and capture it into `out_dir`.

    With `stop`, setting it terminates the child and raises Cancelled.
    """
    fmt = formats.get(cfg.format)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cache = out_dir / "cache"
    cache.mkdir(parents=True)
    log_path = out_dir / "warmup.log"
    cmd = [
        sys.executable, "-m", "torchwarm.warmup",
        "--config", cfg.source, "--workload", w.name, "--format", fmt.name, "--out", str(out_dir),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=torchenv.cache_env(cache), stdout=log, stderr=log)
        while True:
            try:
                proc.wait(timeout=None if stop is None else 0.2)
                break
            except subprocess.TimeoutExpired:
                if stop is not None and stop.is_set():
                    proc.terminate()
                    proc.wait()
                    raise Cancelled(f"warm-up of {w.name!r} cancelled") from None
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise WarmupError(
            f"warm-up of {w.name!r} failed (exit {proc.returncode}): {tail[0]} "
            f"(full log: {log_path})"
        )
    child = json.loads((out_dir / "child.json").read_text())
    captured = fmt.capture(cache, out_dir)
    shutil.rmtree(cache)
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
        "warmup_key": warmup_key(w, fmt.name, fingerprint.digest(child["fingerprint"])),
    }
    result = WarmupResult(w.name, fmt.name, child["fingerprint"], summary, captured)
    result.save(out_dir)
    return result


def _child(argv: list[str]) -> int:
    """Runs in the warm-up subprocess, with TORCHINDUCTOR_CACHE_DIR set by the parent."""
    p = argparse.ArgumentParser(prog="python -m torchwarm.warmup")
    p.add_argument("--config", required=True)
    p.add_argument("--workload", required=True)
    p.add_argument("--format", required=True)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    from . import workload

    try:
        w = cfgmod.load(a.config).workload(a.workload)
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
