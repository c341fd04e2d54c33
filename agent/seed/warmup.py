"""Warm-up: compile a workload in a fresh cache dir, in its own subprocess, and capture it.

A subprocess per workload keeps captures from mixing (torch's mega-cache saves are
cumulative per process) and gives every warm-up an empty cache dir, so the capture
holds exactly what the workload needs: a fresh folder, or, for a workload with
`at_node_path` (commands by default), the config's cache_dir itself, the node's path,
with what the seed had there set aside and put back (nodepath.py). What the child is
comes from the workload's kind (kinds.py): for a model workload it runs
`python -m torchwarm.seed.warmup` and gets its workload as JSON (never the config); a
command workload's child is its own command.
Neither gets any TORCHWARM_* variable (it runs the user's code and must hold no signing
key); each runs in a process group of its own, killed whole when the warm-up passes its
timeout (processes.py).

Output folder layout (what `torchwarm push --from DIR` reads):
    DIR/<workload>/warmup.json   fingerprint, counters, timings, captured blob files
    DIR/<workload>/<blob files>  as the format named them
    DIR/<workload>/warmup.log    the child's output (a command's report line is read here)
    DIR/<workload>/cache/        the warmed cache dir itself, as the child left it
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torchwarm import config as cfgmod
from torchwarm import formats
from torchwarm.config import Config, Workload
from torchwarm.env import compat, fingerprint, torchenv
from torchwarm.errors import Cancelled, ConfigError, TorchwarmError, WarmupError
from torchwarm.formats import Captured
from torchwarm.seed import canary, kinds, nodepath
from torchwarm.seed import child as workload
from torchwarm.seed.processes import child_env
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
    w: Workload,
    fmt: str,
    fingerprint_digest: str,
    env: Mapping[str, str] | None = None,
    *,
    cache_dir: Path | None = None,
) -> str:
    """What decides whether a stored warm-up is still current: the workload's config, its
    code (the model's whole top-level package, as `codeid.code_identity` hashes it, or a
    command's `code` files: kinds.Kind.key), the config's `env` (every warm-up gets it),
    the capture format and the environment; for a workload with at_node_path, the
    config's `cache_dir` too, since a cache that holds its own path holds that one.

    The seed daemon skips a workload whose manifest carries this key. A model's package
    is hashed whole because its factory's module imports its siblings: an edited
    submodule changes what is compiled. Other packages are not hashed (pin them in the
    image; a new torch changes the fingerprint). A command's code is whatever its `code`
    list names, and nothing else.
    """
    doc: dict[str, Any] = {
        **kinds.of(w).key(w),
        "format": fmt,
        "fingerprint": fingerprint_digest,
        "torchwarm_format_version": manifest.FORMAT_VERSION,
    }
    if env:
        doc["env"] = dict(env)
    if w.at_node_path and cache_dir is not None:
        doc["cache_dir"] = str(cache_dir)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def warmup(
    cfg: Config,
    w: Workload,
    out_dir: Path,
    stop: threading.Event | None = None,
    on_capture: Callable[[], None] | None = None,
) -> WarmupResult:
    """Warm `w` up in a child process with an empty cache dir (_cache_dir) and capture it
    into `out_dir`.

    The child is the workload kind's (kinds.run): `python -m torchwarm.seed.warmup` for a
    model, the command itself, in its cwd with its env on top of the config's, for a
    command. It runs in a process group of its own. Past `w.warmup_timeout_s` the group
    (the child and whatever it started) is killed and WarmupError says so; with `stop`,
    setting it kills the group and raises Cancelled. `on_capture()` is called when the
    child has exited well, before the capture.
    """
    compat.require_supported()  # before anything runs: a capture relies on torch's internals
    kind = kinds.of(w)
    fmt = formats.get(cfg.format)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    with _cache_dir(cfg, w, out_dir / "cache", stop) as cache:
        _refuse_fingerprint_changes(w, child_env(cache), {**cfg.env, **kind.env(w)}, cache)
        try:
            ran = kinds.run(cfg, w, fmt.name, cache, out_dir, stop=stop)
        except (WarmupError, Cancelled):
            shutil.rmtree(cache, ignore_errors=True)  # the log stays: the error names it
            raise
        if on_capture is not None:
            on_capture()
        captured = fmt.capture(cache, out_dir)
        captured = canary.check(cfg, w, fmt, ran, captured, stop)  # precompile: entries load?
        unpacked = fmt.unpacked_bytes(cache)
        fields, summary = kind.result(w, ran)
    summary = {**fmt.manifest_fields(w, out_dir), **summary}
    summary["unpacked_bytes"] = unpacked  # what a node needs free to install it
    if w.at_node_path:  # a node installing elsewhere says so (report.describe)
        summary["warmed_at"] = str(cfg.cache_dir)
    summary["warmup_key"] = warmup_key(w, fmt.name, fingerprint.digest(fields), cfg.env,
                                     cache_dir=cfg.cache_dir)  # fmt: skip
    result = WarmupResult(w.name, fmt.name, fields, summary, captured)
    result.save(out_dir)
    return result


@contextlib.contextmanager
def _cache_dir(
    cfg: Config, w: Workload, fresh: Path, stop: threading.Event | None
) -> Iterator[Path]:
    """Where `w` compiles: `fresh`, an empty folder; or, with at_node_path, cfg.cache_dir
    itself, lent by nodepath (the tree it leaves ends at `fresh` too), so that a cache
    holding its own absolute path hits on the node."""
    if w.at_node_path:
        with nodepath.lend(cfg.cache_dir, fresh, stop, f"workload {w.name!r}",
                           w.warmup_timeout_s) as cache:  # fmt: skip
            yield cache
    else:
        fresh.mkdir()
        yield fresh


def _refuse_fingerprint_changes(
    w: Workload, base: Mapping[str, str], extra: Mapping[str, str], cache: Path
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
            where = "its env" if name in kinds.of(w).env(w) else "env"
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
    (a.out / kinds.CHILD_RESULT).write_text(json.dumps(doc, indent=2))
    print(json.dumps({"first_call_s": report.first_call_s, "counters": report.counters}))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
