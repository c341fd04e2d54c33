"""`precompile`: the whole cache dir (as `cachedir`) plus torch's precompiled Dynamo entries.

The seed compiles in torch's caching-precompile mode (TORCH_CACHING_PRECOMPILE), and
save_cache_artifacts() writes one Dynamo entry per compiled top-level function to
`<cache>/dynamo/<sha256(qualname + first line)>/entry`: Dynamo's bytecode and guards
plus the compiled graphs with their kernels. A node that loads it skips tracing and
compiling (first call in milliseconds). The entry is checked by torch only for Python,
torch and GPU versions and the source lines of the functions it inlined, so a node
installs it only when precompile.decide() finds the same model code and settings.

Two blobs:
  cachedir   every other file of the cache dir (FX graphs, AOTAutograd entries, kernels),
             so a guard failure, a shape never warmed or a node without precompile
             compiles from a warm FX-graph cache
  dynamo     the `dynamo/<key>/entry` files
After compiling, the seed runs the workload once more without precompile mode, so that
the AOTAutograd entries such a node looks up (other keys than precompile's) exist too.
Then the canary (seed/canary.py) loads the entries in a fresh process; when that fails
they are dropped (drop_entries): the `dynamo` blob is empty and the manifest says why.

A model workload compiles in torchwarm's child, which calls prepare_in_process and
save_in_process. A command workload compiles in its own processes, which the hook
(seed/hook/) puts in precompile mode and makes save; its fallback run and its state
(record_command) come from the seed's side after it exited.
docs/precompile.md has the measurements behind each choice.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchwarm.env import codeid, compat
from torchwarm.env.compat import DYNAMO_DIR, DYNAMO_ENTRY
from torchwarm.errors import ArchiveError, ConfigError, WarmupError
from torchwarm.formats.base import Blobs, Captured, cache_members, tree_bytes
from torchwarm.node.precompile_rules import SCHEME
from torchwarm.spec import archive
from torchwarm.util import fs

if TYPE_CHECKING:
    from torchwarm.config import Workload

STATE = "precompile.json"  # in the warm-up out dir: what the child tells capture/manifest
DROPPED_DIR = "dropped-dynamo"  # in the out dir: entries the canary refused, for a look
# warmup.precompile.entries: the canary loaded them (kept), or they are not published.
KEPT, DROPPED, UNCHECKED = "kept", "dropped", "unchecked"


class PrecompileFormat:
    name = "precompile"

    def prepare_in_process(self, w: Workload, out_dir: Path) -> None:
        if w.mode == "train":
            # Measured on torch 2.13: the node's first backward through a loaded entry
            # raises "TypeError: assigned grad expected to be a Tensor or None".
            raise ConfigError(
                f"workload {w.name!r}: format 'precompile' cannot capture mode: train "
                "(a node's backward through torch's precompiled entries fails); "
                "use format cachedir for training workloads"
            )
        identity = codeid.code_identity(w.model)  # before anything imports the model
        compat.set_caching_precompile(True)
        # A node that loads an entry and then recompiles (a shape never warmed) draws the
        # names of Dynamo's globals from 0 again; the seed's start at a base drawn from
        # the workload, far away, so that the two never meet.
        compat.set_unique_id_base(_id_base(w))
        _write_state(out_dir, {"code_identity": identity.to_dict()})

    def save_in_process(self, w: Workload, out_dir: Path) -> None:
        import torch

        from torchwarm.seed import child as workload

        torch.compiler.save_cache_artifacts()  # writes the Dynamo entries in this mode
        keys = dynamo_keys(workload.cache_dir())
        if not keys:
            raise WarmupError(
                f"workload {w.name!r}: torch wrote no precompiled Dynamo entry (it "
                "bypasses graphs it cannot serialize); use format cachedir for it"
            )
        state = read_state(out_dir)
        if codeid.code_identity(w.model).to_dict() != state["code_identity"]:
            raise WarmupError(
                f"workload {w.name!r}: the model code changed during the warm-up; run it again"
            )
        # The FX-graph path's own pass: a node without precompile mode (or whose entries
        # were left out) looks up AOTAutograd entries under other keys than this mode
        # wrote, and every FX graph should hit.
        compat.set_caching_precompile(False)
        torch.compiler.reset()
        compat.counters().clear()
        t0 = time.perf_counter()
        report = workload.run(w)
        state["dynamo_keys"] = keys
        state["fallback"] = {
            "counters": report.counters,
            "first_call_s": round(report.first_call_s, 3),
            "so_files": report.new_so_files,
            "wall_s": round(time.perf_counter() - t0, 3),
        }
        _write_state(out_dir, state)

    def capture(self, cache_dir: Path, out_dir: Path) -> list[Captured]:
        rest, entries = out_dir / "cachedir.tar.zst", out_dir / "dynamo.tar.zst"
        archive.write(cache_dir, cache_members(cache_dir), rest)
        archive.write(cache_dir, cache_members(cache_dir, dynamo=True), entries)
        return [
            Captured("cachedir", rest, archive.MEDIA_TYPE),
            Captured("dynamo", entries, archive.MEDIA_TYPE),
        ]

    def manifest_fields(self, w: Workload, out_dir: Path) -> dict[str, Any]:
        state = read_state(out_dir)
        meta = {
            "scheme": SCHEME,
            "code_identity": state["code_identity"],
            "workload_sha256": codeid.workload_identity(w),
            "dynamo_keys": state["dynamo_keys"],
            "fallback": state["fallback"],
            # Only the canary says "kept" (seed/canary.py); a node installs nothing else.
            "entries": state.get("entries", UNCHECKED),
        }
        if meta["entries"] != KEPT:
            meta["entries_reason"] = state.get("entries_reason", "the canary did not run")
        if "canary" in state:
            meta["canary"] = state["canary"]
        return {"precompile": meta}

    def unpacked_bytes(self, cache_dir: Path) -> int:
        members = cache_members(cache_dir) + cache_members(cache_dir, dynamo=True)
        return tree_bytes(cache_dir, members)

    def install(self, blobs: Blobs, staging: Path, *, precompiled: bool = False) -> None:
        rest = archive.extract(blobs["cachedir"], staging)
        if any(n.split("/", 1)[0] == DYNAMO_DIR for n in rest):
            raise ArchiveError(
                f"{blobs['cachedir'].name}: the cachedir blob of a precompile capture holds "
                "Dynamo entries; refusing (they travel only in the dynamo blob)"
            )
        keys = []

        def entry(name: str) -> None:
            m = DYNAMO_ENTRY.fullmatch(name)
            if m is None:
                raise ArchiveError(
                    f"{blobs['dynamo'].name}: member {name!r} is not a Dynamo entry "
                    "(dynamo/<sha256>/entry); refusing"
                )
            keys.append(m.group(1))

        if precompiled:
            archive.extract(blobs["dynamo"], staging, check=entry)
            return
        archive.members(blobs["dynamo"], check=entry)  # checked, not installed
        for key in keys:  # an entry an earlier install left must not outlive its check
            shutil.rmtree(staging / DYNAMO_DIR / key, ignore_errors=True)


def record_command(w: Workload, cache_dir: Path, out_dir: Path, fallback: dict[str, Any]) -> None:
    """A command workload's state, after its precompile run and its `fallback` run (what
    save_in_process records for a model): its code identity from what the hook wrote
    (seed/hook/), the keys of its entries; the entries are dropped at once, with the
    reason, when the command imported code that identity cannot cover.

    WarmupError when no process of the command ran the hook or wrote an entry.
    """
    from torchwarm.seed import hook

    command = w.command
    assert command is not None, "record_command is for command workloads"
    records = hook.records(cache_dir)
    if not records:
        raise WarmupError(
            f"workload {w.name!r}: no Python process of the command ran torchwarm's "
            "precompile hook and imported torch (a program that is not Python, a Python "
            "started with -I or -E, or one that ignores PYTHONPATH); use format cachedir"
        )
    keys = dynamo_keys(cache_dir)
    if not keys:
        raise WarmupError(
            f"workload {w.name!r}: torch wrote no precompiled Dynamo entry (the command "
            "compiled nothing, or torch bypassed graphs it cannot serialize); use format "
            "cachedir for it"
        )
    problems: list[str] = []
    seen: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        for d in r.get("distributions") or ():
            seen.setdefault(d["name"], []).append(d)
        problems += [f"the hook could not identify distribution {e}" for e in r.get("errors") or ()]
        problems += [
            f"module {name!r} ({file}) belongs to no installed distribution and is under "
            "none of the workload's code paths; add it to code"
            for name, file in sorted((r.get("unowned") or {}).items())
            if not _under(Path(file), command.code)
        ]
    dists = []
    for name, found in sorted(seen.items()):
        merged, why = _merged(found)
        if merged is None:
            problems.append(f"distribution {name!r}: {why}")
        else:
            dists.append(merged)
    state: dict[str, Any] = {
        "code_identity": codeid.command_identity(command.code, command.argv, dists),
        "dynamo_keys": keys,
        "fallback": fallback,
    }
    _write_state(out_dir, state)
    if problems:
        drop_entries(cache_dir, out_dir, problems[0])


def _merged(found: list[dict[str, Any]]) -> tuple[codeid.DistIdentity | None, str]:
    """One distribution as every process that imported it saw it: the union of their
    modules (a worker may import one the launcher did not). Its RECORD digest does not
    depend on the modules; an editable install's is rebuilt from each module's digest.
    (None, why) when the processes disagree."""
    first = found[0]
    modules = sorted({m for d in found for m in d["modules"]})
    if any(d["version"] != first["version"] for d in found):
        return None, "the command's processes imported different versions of it"
    if first["digest"].startswith("record:"):
        if any(d["digest"] != first["digest"] for d in found):
            return None, "the command's processes imported different installs of it"
        digest = first["digest"]
    else:
        digests: dict[str, str] = {}
        for d in found:
            for m, h in (d.get("module_digests") or {}).items():
                if digests.setdefault(m, h) != h:
                    return None, f"the command's processes imported different code of {m!r}"
        if sorted(digests) != modules:
            return None, "the hook recorded no digest for some of its modules"
        digest = codeid.modules_digest(digests)
    return codeid.DistIdentity(first["name"], first["version"], digest, tuple(modules)), ""


def drop_entries(cache_dir: Path, out_dir: Path, reason: str) -> None:
    """Take the capture's Dynamo entries out of `cache_dir` (into out_dir/DROPPED_DIR) and
    record why: capture() then writes an empty `dynamo` blob, and the manifest says
    entries: dropped with `reason`, so that a node installs the FX-graph part only."""
    state = read_state(out_dir)
    for key in state["dynamo_keys"]:
        src = cache_dir / DYNAMO_DIR / key
        if src.is_dir():
            dest = out_dir / DROPPED_DIR / key
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(dest, ignore_errors=True)
            shutil.move(src, dest)
    state.update(entries=DROPPED, entries_reason=reason, dropped_keys=state["dynamo_keys"])
    state["dynamo_keys"] = []
    _write_state(out_dir, state)


def record_canary(out_dir: Path, passed: bool, summary: dict[str, Any]) -> None:
    """The canary's verdict: entries kept when it `passed`; what it saw either way."""
    state = read_state(out_dir)
    state["canary"] = summary
    if passed:
        state["entries"] = KEPT
    _write_state(out_dir, state)


def _under(path: Path, roots: tuple[Path, ...]) -> bool:
    p = path.resolve()
    return any(p == r.resolve() or p.is_relative_to(r.resolve()) for r in roots)


def dynamo_keys(cache_dir: Path) -> list[str]:
    """The keys of the Dynamo entries in a cache dir."""
    root = cache_dir / DYNAMO_DIR
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if DYNAMO_ENTRY.fullmatch(f"{DYNAMO_DIR}/{p.name}/entry") and (p / "entry").is_file()
    )


def _id_base(w: Workload) -> int:
    return 10**6 * (1 + int(codeid.workload_identity(w)[:6], 16) % 4096)


def _write_state(out_dir: Path, state: dict[str, Any]) -> None:
    data = json.dumps(state, indent=2, sort_keys=True) + "\n"
    fs.atomic_write_bytes(out_dir / STATE, data.encode())


def read_state(out_dir: Path) -> dict[str, Any]:
    """What the warm-up recorded for the capture in `out_dir` (STATE)."""
    doc: dict[str, Any] = json.loads((out_dir / STATE).read_text())
    return doc
