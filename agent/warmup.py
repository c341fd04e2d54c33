"""Warm-up: compile a workload in a fresh cache dir, in its own subprocess, and capture it.

A subprocess per workload keeps captures from mixing (torch's mega-cache saves are
cumulative per process) and gives every warm-up an empty cache dir, so the capture
holds exactly what the workload needs. The child runs `python -m agent.warmup`.

Output folder layout (what `torchwarm push --from DIR` reads):
    DIR/<workload>/warmup.json   fingerprint, counters, timings, captured blob files
    DIR/<workload>/<blob files>  as the format named them
    DIR/<workload>/warmup.log    the child's output
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import config as cfgmod
from . import formats, torchenv
from .config import Config, Workload
from .errors import TorchwarmError, WarmupError
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


def warmup(cfg: Config, w: Workload, out_dir: Path) -> WarmupResult:
    """Warm `w` up in a child process with an empty cache dir and capture it into `out_dir`."""
    fmt = formats.get(cfg.format)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cache = out_dir / "cache"
    cache.mkdir(parents=True)
    log_path = out_dir / "warmup.log"
    cmd = [
        sys.executable, "-m", "agent.warmup",
        "--config", cfg.source, "--workload", w.name, "--format", fmt.name, "--out", str(out_dir),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.run(cmd, env=torchenv.cache_env(cache), stdout=log, stderr=log)
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
    }
    result = WarmupResult(w.name, fmt.name, child["fingerprint"], summary, captured)
    result.save(out_dir)
    return result


def _child(argv: list[str]) -> int:
    """Runs in the warm-up subprocess, with TORCHINDUCTOR_CACHE_DIR set by the parent."""
    p = argparse.ArgumentParser(prog="python -m agent.warmup")
    p.add_argument("--config", required=True)
    p.add_argument("--workload", required=True)
    p.add_argument("--format", required=True)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    from . import fingerprint, workload

    try:
        w = cfgmod.load(a.config).workload(a.workload)
        report = workload.run(w)  # first: its first-call time is the honest cold figure
        fields = fingerprint.collect()
        formats.get(a.format).save_in_process(a.out)
    except TorchwarmError as e:
        print(f"torchwarm: error: {e}", file=sys.stderr)
        return e.exit_code
    doc = {"fingerprint": fields, "report": report.to_dict()}
    (a.out / "child.json").write_text(json.dumps(doc, indent=2))
    print(json.dumps({"first_call_s": report.first_call_s, "counters": report.counters}))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
