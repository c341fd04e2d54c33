"""Warm-up: compile a workload in a fresh cache dir, in its own subprocess, and capture it.

A subprocess per workload keeps captures from mixing (torch's mega-cache saves are
cumulative per process) and gives every warm-up an empty cache dir, so the capture
holds exactly what the workload needs. For a model workload the child runs
`python -m torchwarm.seed.warmup` and gets its workload as JSON (never the config); a command
workload's child is its own command. Neither gets any TORCHWARM_* variable (it runs the
user's code and must hold no signing key); each runs in a process group of its own,
killed whole when the warm-up passes its timeout (command.py).

Output folder layout (what `torchwarm push --from DIR` reads):
    DIR/<workload>/warmup.json   fingerprint, counters, timings, captured blob files
    DIR/<workload>/<blob files>  as the format named them
    DIR/<workload>/warmup.log    the child's output (a command's report line is read here)
    DIR/<workload>/cache/        the warmed cache dir itself, as the child left it
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torchwarm import config as cfgmod
from torchwarm import formats
from torchwarm.config import Config, Workload
from torchwarm.env import codeid, fingerprint, torchenv
from torchwarm.errors import Cancelled, ConfigError, TorchwarmError, WarmupError
from torchwarm.formats import Captured
from torchwarm.node import precompile_rules as precompile
from torchwarm.seed import child as workload
from torchwarm.seed import processes as command
from torchwarm.spec import manifest

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


def warmup_key(
    w: Workload, fmt: str, fingerprint_digest: str, env: Mapping[str, str] | None = None
) -> str:
    """What decides whether a stored warm-up is still current: the workload's config, its
    code (the model's whole top-level package, as `codeid.code_identity` hashes it, or a
    command's `code` files), the config's `env` (every warm-up gets it), the capture
    format and the environment.

    The seed daemon skips a workload whose manifest carries this key. A model's package
    is hashed whole because its factory's module imports its siblings: an edited
    submodule changes what is compiled. Other packages are not hashed (pin them in the
    image; a new torch changes the fingerprint). A command's code is whatever its `code`
    list names, and nothing else.
    """
    settings = asdict(w)
    del settings["warmup_timeout_s"]  # how long it may take does not change what it compiles
    doc: dict[str, Any] = {
        "workload": settings,
        "format": fmt,
        "fingerprint": fingerprint_digest,
        "torchwarm_format_version": manifest.FORMAT_VERSION,
    }
    if w.command is None:
        del settings["command"]  # a model workload's key is what it was before commands
        doc["model_code_sha256"] = codeid.code_identity(str(w.model)).sha256
    else:
        doc["code_sha256"] = command.code_digest(w.command.code)
    if env:
        doc["env"] = dict(env)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def warmup(
    cfg: Config,
    w: Workload,
    out_dir: Path,
    stop: threading.Event | None = None,
    on_capture: Callable[[], None] | None = None,
) -> WarmupResult:
    """Warm `w` up in a child process with an empty cache dir and capture it into `out_dir`.

    A model workload runs in `python -m torchwarm.seed.warmup`; a command workload is its own
    command, in its cwd, with its env on top of the config's. Either runs in a process
    group of its own. Past `w.warmup_timeout_s` the group (the child and whatever it
    started) is killed and WarmupError says so; with `stop`, setting it kills the group
    and raises Cancelled. `on_capture()` is called when the child has exited well,
    before the capture.
    """
    fmt = formats.get(cfg.format)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cache = out_dir / "cache"
    cache.mkdir(parents=True)
    log_path = out_dir / "warmup.log"
    extra = {**cfg.env, **(w.command.env if w.command else {})}
    env = child_env(cache, extra)
    _refuse_fingerprint_changes(w, child_env(cache), extra, cache)
    who = f"workload {w.name!r}"
    if w.command is None:
        doc = {k: v for k, v in asdict(w).items() if k != "command"}
        argv = [
            sys.executable, "-m", "torchwarm.seed.warmup", "--workload-json", json.dumps(doc),
            "--format", fmt.name, "--out", str(out_dir),
        ]  # fmt: skip
        ended = command.run(who, argv, env, log_path, w.warmup_timeout_s, stop=stop)
        what = f"warm-up of {w.name!r}"
    else:
        fields = fingerprint.collect(env)  # what the command's own torch sees
        ended = command.run(who, w.command.argv, env, log_path, w.warmup_timeout_s,
                            cwd=w.command.cwd, stop=stop)  # fmt: skip
        what = f"warm-up of {w.name!r} (command {shlex.join(w.command.argv)})"
    if ended.how != "exited" or ended.returncode != 0:
        shutil.rmtree(cache, ignore_errors=True)  # the log stays: the error names it
    if ended.how == "cancelled":
        raise Cancelled(f"warm-up of {w.name!r} cancelled")
    if ended.how == "timeout":
        raise WarmupError(
            f"{what} did not finish within {w.warmup_timeout_s:g} s "
            f"(warmup_timeout_s); killed it and its child processes; last output: "
            f"{command.last_line(log_path)} (full log: {log_path})"
        )
    if ended.returncode != 0:
        raise WarmupError(
            f"{what} failed (exit {ended.returncode}): {command.last_line(log_path)} "
            f"(full log: {log_path})"
        )
    if on_capture is not None:
        on_capture()
    captured = fmt.capture(cache, out_dir)
    unpacked = sum((cache / m).stat().st_size for m in formats.cache_members(cache))
    if w.command is None:
        child = json.loads((out_dir / "child.json").read_text())
        fields = child["fingerprint"]
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
        }
    else:
        summary = {
            **fmt.manifest_fields(w, out_dir),
            "command": list(w.command.argv),
            "env": sorted(extra),  # names only: values may hold paths or secrets
            "wall_s": round(ended.wall_s, 3),
            # Only what the command printed (command.REPORT_KEY), never made up.
            **(command.read_report(log_path) or {}),
            "so_files": workload.count_so(cache),  # the cache dir started empty
        }
    summary["unpacked_bytes"] = unpacked  # what a node needs free to install it
    summary["warmup_key"] = warmup_key(w, fmt.name, fingerprint.digest(fields), cfg.env)
    result = WarmupResult(w.name, fmt.name, fields, summary, captured)
    result.save(out_dir)
    return result


def child_env(cache: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A warm-up's environment: this process's, plus `extra` (the config's and a command's
    `env`, {cache_dir} meaning `cache`), torch's caches in `cache`, torch's precompile
    mode off, and no TORCHWARM_* variable.

    The child runs the user's model code or command, so it must hold no signing key: not
    $TORCHWARM_SIGNING_KEY, nor $TORCHWARM_SIGNING_KEY_FILE or the config file that would
    lead to one. A model workload's child gets its workload as JSON on the command line.
    Precompile mode is set by the `precompile` format alone (in the child): a command
    compiling with it would leave AOTAutograd entries no node looks up.
    """
    env = torchenv.cache_env(cache, extra=extra)
    env.pop(precompile.ENV_VAR, None)
    return {k: v for k, v in env.items() if not k.startswith("TORCHWARM_")}


def _refuse_fingerprint_changes(
    w: Workload, base: dict[str, str], extra: Mapping[str, str], cache: Path
) -> None:
    """ConfigError when a variable of `env` changes the fingerprint (OMP_NUM_THREADS, a
    TORCHINDUCTOR_* setting): a node reads its fingerprint from the pull's own
    environment, which `env` never reaches, so that cache would never be taken.

    Decided from the variables the fingerprint declares it reads (fingerprint.env_fields),
    without computing it: each computation may start torch to list the GPUs.
    """
    for name, value in torchenv.expand(extra, cache).items():
        changed = fingerprint.env_fields(name)
        if changed and base.get(name) != value:
            where = "its env" if name in (w.command.env if w.command else {}) else "env"
            raise ConfigError(
                f"workload {w.name!r}: {where} sets {name}, which changes fingerprint "
                f"field(s) {', '.join(changed)}; a node reads those from the environment "
                f"torchwarm runs in, never from env: set {name} there (seed and node), "
                "not in env"
            )


def _child(argv: list[str]) -> int:
    """Runs in the warm-up subprocess, with TORCHINDUCTOR_CACHE_DIR set by the parent."""
    p = argparse.ArgumentParser(prog="python -m torchwarm.seed.warmup")
    p.add_argument("--workload-json", required=True, help="the workload, as warmup() wrote it")
    p.add_argument("--format", required=True)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
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
