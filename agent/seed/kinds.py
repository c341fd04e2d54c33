"""Workload kinds: what differs between a model workload (a factory that torchwarm's own
child compiles) and a command workload (a process of the user's), behind one protocol.

The warm-up, its key, the config's checks and `torchwarm probe` ask a workload's kind
(`of`, the one place that tells the kinds apart) and never switch on it. A kind says:
which capture formats it allows, what its warm-up process is (argv, cwd, the env it
adds to the config's), what of it goes into the warm-up key, how the fingerprint and
the manifest's summary are read once that process exited, and how it is probed against
a cache dir. `run` is the one path that starts a warm-up process and turns how it ended
into an error.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from torchwarm import config
from torchwarm.config import FORMATS, Command, Config, Server, Workload
from torchwarm.env import codeid, fingerprint
from torchwarm.errors import Cancelled, WarmupError
from torchwarm.seed import child, hook, processes, server

LOG = "warmup.log"  # the warm-up process's output, in its out_dir (a command's report line)
CHILD_RESULT = "child.json"  # what a model workload's child wrote: fingerprint and counters


@dataclass(frozen=True)
class Launch:
    argv: tuple[str, ...]  # run as is: no shell
    cwd: Path | None  # None: this process's
    server: Server | None = None  # set: a server, driven by server.drive until stopped


@dataclass(frozen=True)
class Ran:
    """A warm-up process that exited well, and where it ran."""

    out_dir: Path
    cache: Path  # the cache dir it compiled into
    log: Path
    env: Mapping[str, str]  # its whole environment
    env_names: tuple[str, ...]  # the variables the config's and its own env set
    ended: processes.Ended
    served: server.Served | None = None  # a server's: when it was ready, its requests


@dataclass(frozen=True)
class Probe:
    doc: dict[str, Any]  # `probe --json`
    line: str  # `probe`, for people


class Kind(Protocol):
    name: str  # as messages say it: "model", "command"
    formats: tuple[str, ...]  # the capture formats it allows
    # Where its process saves precompiled entries: True, torchwarm's own warm-up child
    # (formats.precompile in-process, its FX-graph pass included); False, the command's
    # own processes through the hook, then a second run and a canary of the command
    # itself (seed/canary.py).
    saves_in_process: bool
    formats_why: str  # why only those; "" when it allows all

    def env(self, w: Workload) -> Mapping[str, str]:
        """What its warm-up gets on top of the config's `env`, unexpanded."""
        ...

    def label(self, w: Workload) -> str:
        """What follows the workload's name in messages, e.g. " (command python warm.py)"."""
        ...

    def key(self, w: Workload) -> dict[str, Any]:
        """Its part of the warm-up key: its settings and the digest of its code."""
        ...

    def launch(self, w: Workload, fmt: str, out_dir: Path) -> Launch:
        """Its warm-up process, capturing as `fmt` into `out_dir`."""
        ...

    def result(self, w: Workload, ran: Ran) -> tuple[dict[str, Any], dict[str, Any]]:
        """The fingerprint its cache is for, and its part of the manifest's summary."""
        ...

    def warmed(self, summary: dict[str, Any]) -> str:
        """What a warm-up saw, from its summary, for `torchwarm warmup`'s line."""
        ...

    def probe(self, cfg: Config, w: Workload) -> Probe:
        """Run it against cfg.cache_dir (this process's torch cache dir) and say what
        torch's caches did."""
        ...


def of(w: Workload) -> Kind:
    """The kind of `w`."""
    if w.command is None:
        return MODEL
    return COMMAND if w.command.server is None else SERVER


def run(
    cfg: Config,
    w: Workload,
    fmt: str,
    cache: Path,
    out_dir: Path,
    stop: threading.Event | None = None,
    doing: str = "warm-up",
) -> Ran:
    """Run `w`'s warm-up process with its cache dir in `cache`, its output in
    `out_dir`/warmup.log, in a process group of its own (processes.run), and return
    once it exited 0.

    WarmupError naming the log when it failed or ran past `w.warmup_timeout_s` (then it
    and whatever it started were killed); Cancelled when `stop` was set; ConfigError
    when it cannot be started. `doing` names the run in those messages.
    """
    kind = of(w)
    extra = {**cfg.env, **kind.env(w)}
    env = processes.child_env(cache, extra)
    launch = kind.launch(w, fmt, out_dir)
    log = out_dir / LOG
    what = f"{doing} of {w.name!r}{kind.label(w)}"
    if launch.server is not None:  # runs until stopped: ready, requests, stop (or an error)
        served = server.drive(what, f"workload {w.name!r}", launch.server, launch.argv, env,
                              log, w.warmup_timeout_s, cwd=launch.cwd, stop=stop)  # fmt: skip
        return Ran(out_dir, cache, log, env, tuple(sorted(extra)), served.ended, served)
    ended = processes.run(f"workload {w.name!r}", launch.argv, env, log, w.warmup_timeout_s,
                          cwd=launch.cwd, stop=stop)  # fmt: skip
    if ended.how == "cancelled":
        raise Cancelled(f"{doing} of {w.name!r} cancelled")
    if ended.how == "timeout":
        raise WarmupError(
            f"{what} did not finish within {w.warmup_timeout_s:g} s "
            f"(warmup_timeout_s); killed it and its child processes; last output: "
            f"{processes.last_line(log)} (full log: {log})"
        )
    if ended.returncode != 0:
        raise WarmupError(
            f"{what} failed (exit {ended.returncode}): {processes.last_line(log)} (full log: {log})"
        )
    return Ran(out_dir, cache, log, env, tuple(sorted(extra)), ended)


def _settings(w: Workload, *leave_out: str) -> dict[str, Any]:
    """The workload's fields for its key; how long it may take changes nothing compiled."""
    doc = asdict(w)
    for name in ("warmup_timeout_s", *leave_out):
        del doc[name]
    return doc


class ModelKind:
    """A model factory with input sets, compiled by `python -m torchwarm.seed.warmup`,
    which gets its workload as JSON (never the config) and writes child.json."""

    name = "model"
    formats = FORMATS
    saves_in_process = True
    formats_why = ""

    def env(self, w: Workload) -> Mapping[str, str]:
        return {}

    def label(self, w: Workload) -> str:
        return ""

    def key(self, w: Workload) -> dict[str, Any]:
        return {
            "workload": _model_settings(w),
            "model_code_sha256": codeid.code_identity(str(w.model)).sha256,
        }

    def launch(self, w: Workload, fmt: str, out_dir: Path) -> Launch:
        doc = config.workload_doc(w)  # what parse_workload reads back: kwargs included
        return Launch(
            (sys.executable, "-m", "torchwarm.seed.warmup", "--workload-json", json.dumps(doc),
             "--format", fmt, "--out", str(out_dir)),
            None,
        )  # fmt: skip

    def result(self, w: Workload, ran: Ran) -> tuple[dict[str, Any], dict[str, Any]]:
        done = json.loads((ran.out_dir / CHILD_RESULT).read_text())
        report = done["report"]
        return done["fingerprint"], {
            "mode": w.mode,
            "device": w.device,
            **({"method": w.method} if w.method != "__call__" else {}),
            "compile": _compile_summary(w),
            "input_sets": [_input_set_summary(w, i) for i in range(len(w.inputs))],
            "counters": report["counters"],
            "first_call_s": round(report["first_call_s"], 3),
            "so_files": report["new_so_files"],
        }

    def warmed(self, summary: dict[str, Any]) -> str:
        return (
            f"first call {summary['first_call_s']:.2f} s cold, fxgraph misses "
            f"{summary['counters']['fxgraph_cache_miss']}, {summary['so_files']} kernels compiled"
        )

    def probe(self, cfg: Config, w: Workload) -> Probe:
        r = child.run(w)  # in this process: the caller pointed its cache dir at cfg.cache_dir
        c = r.counters
        return Probe(
            r.to_dict(),
            f"{w.name}: first call {r.first_call_s:.2f} s; "
            f"fxgraph hit {c['fxgraph_cache_hit']} "
            f"miss {c['fxgraph_cache_miss']}; aot_autograd hit {c['autograd_cache_hit']} "
            f"miss {c['autograd_cache_miss']}; dynamo cache hit {c['dynamo_cache_hit']} "
            f"miss {c['dynamo_cache_miss']}; kernels compiled {r.new_so_files}",
        )


# What a model workload's key held before keyword inputs, methods, compile targets, tensor
# fills and at_node_path existed: each is left out at its default, so that a workload
# that uses none of them keeps its key (and is not warmed again after an upgrade).
_MODEL_DEFAULTS = {"kwargs": (), "method": "__call__", "at_node_path": False}


def _model_settings(w: Workload) -> dict[str, Any]:
    doc = _settings(w, "command")
    for name, default in _MODEL_DEFAULTS.items():
        if doc[name] == default:
            del doc[name]
    if doc["compile"]["target"] == "module":
        del doc["compile"]["target"]
    for specs in doc["inputs"]:
        for t in specs:
            if t["fill"] is None:
                del t["fill"]
    return doc


def _compile_summary(w: Workload) -> dict[str, Any]:
    """The compile options as the manifest says them; the target only when not module."""
    target = {"target": w.compile.target} if w.compile.target != "module" else {}
    return {**w.compile.as_kwargs(), **target}


def _input_set_summary(w: Workload, i: int) -> list[dict[str, Any]]:
    """Input set `i` for the manifest: its positional tensors, then its keyword inputs,
    each with its name (a tensor's shape and dtype, a constant's value)."""
    tensors = [
        {"shape": list(t.shape), "dtype": t.dtype, "dynamic": list(t.dynamic)} for t in w.inputs[i]
    ]
    return tensors + [{"name": k, **v} for k, v in child.kwargs_doc(w.call_kwargs(i)).items()]


class CommandKind:
    """A process of the user's (a warm-up script, a server start plus a warm request),
    run as is in its cwd with its env; it compiles whatever it compiles, and may print a
    report line (processes.REPORT_KEY) so that its counters reach the manifest."""

    name = "command"
    # precompile: the hook saves from inside the command's own processes (seed/hook/).
    formats = ("cachedir", "precompile")
    saves_in_process = False
    formats_why = "megacache saves from inside the compiling process"

    def env(self, w: Workload) -> Mapping[str, str]:
        return _command(w).env

    def label(self, w: Workload) -> str:
        return f" (command {shlex.join(_command(w).argv)})"

    def key(self, w: Workload) -> dict[str, Any]:
        return {"workload": _settings(w), "code_sha256": processes.code_digest(_command(w).code)}

    def launch(self, w: Workload, fmt: str, out_dir: Path) -> Launch:
        argv = _command(w).argv
        return Launch(hook.launch_argv(argv) if fmt == "precompile" else argv, _command(w).cwd)

    def result(self, w: Workload, ran: Ran) -> tuple[dict[str, Any], dict[str, Any]]:
        return fingerprint.collect(ran.env), {  # what the command's own torch saw
            "command": list(_command(w).argv),
            "env": list(ran.env_names),  # names only: values may hold paths or secrets
            "wall_s": round(ran.ended.wall_s, 3),
            # Only what the command printed (processes.REPORT_KEY), never made up.
            **(processes.read_report(ran.log) or {}),
            "so_files": child.count_so(ran.cache),  # the cache dir started empty
        }

    def warmed(self, summary: dict[str, Any]) -> str:
        c = summary.get("counters")
        seen = (
            f"fxgraph misses {c.get('fxgraph_cache_miss', '?')} (as the command reported)"
            if c is not None
            else "the command reported no counters"
        )
        return f"command ran {summary['wall_s']:.2f} s, {seen}, {summary['so_files']} kernels"

    def probe(self, cfg: Config, w: Workload) -> Probe:
        cache = cfg.cache_dir
        so_before = child.count_so(cache)
        scratch = Path(tempfile.mkdtemp(prefix="torchwarm-probe-"))
        ran = run(cfg, w, cfg.format, cache, scratch, doing="probe")  # its log stays on failure
        reported = processes.read_report(ran.log) or {}
        shutil.rmtree(scratch, ignore_errors=True)
        doc = {
            "workload": w.name, "cache_dir": str(cache), "command": list(_command(w).argv),
            "wall_s": round(ran.ended.wall_s, 3), "counters": reported.get("counters"),
            "first_call_s": reported.get("first_call_s"),
            "new_so_files": child.count_so(cache) - so_before, **self._probed(w, ran),
        }  # fmt: skip
        c = doc["counters"]
        seen = (
            f"fxgraph hit {c.get('fxgraph_cache_hit', '?')} "
            f"miss {c.get('fxgraph_cache_miss', '?')}; "
            f"aot_autograd hit {c.get('autograd_cache_hit', '?')} "
            f"miss {c.get('autograd_cache_miss', '?')} (as the command reported)"
            if c is not None
            else f"the command printed no {processes.REPORT_KEY} line, so its hits are unknown"
        )
        return Probe(doc, f"{w.name}: command ran {doc['wall_s']:.2f} s; {seen}; "
                          f"kernels compiled {doc['new_so_files']}")  # fmt: skip

    def _probed(self, w: Workload, ran: Ran) -> dict[str, Any]:
        """What its kind adds to `probe --json`."""
        return {}


class ServerKind(CommandKind):
    """A command that starts a server (command.server): torchwarm waits until it is ready,
    sends its warm-up requests and stops it (server.py); otherwise a command."""

    name = "server"

    def label(self, w: Workload) -> str:
        return f" (server {shlex.join(_command(w).argv)})"

    def key(self, w: Workload) -> dict[str, Any]:
        doc = super().key(w)
        for name in ("ready_timeout_s", "request_timeout_s", "stop_grace_s"):
            del doc["workload"]["command"]["server"][name]  # how long: nothing compiled
        return doc

    def launch(self, w: Workload, fmt: str, out_dir: Path) -> Launch:
        return replace(super().launch(w, fmt, out_dir), server=_server(w))

    def result(self, w: Workload, ran: Ran) -> tuple[dict[str, Any], dict[str, Any]]:
        fields, summary = super().result(w, ran)
        return fields, {**summary, **self._probed(w, ran)}

    def warmed(self, summary: dict[str, Any]) -> str:
        return f"{server.describe(summary['server'])}; {super().warmed(summary)}"

    def probe(self, cfg: Config, w: Workload) -> Probe:
        p = super().probe(cfg, w)
        return Probe(p.doc, f"{w.name}: {server.describe(p.doc['server'])}; "
                            f"{p.line.removeprefix(f'{w.name}: ')}")  # fmt: skip

    def _probed(self, w: Workload, ran: Ran) -> dict[str, Any]:
        assert ran.served is not None, "run() drives a server workload through server.drive"
        return {"server": ran.served.summary(_server(w))}


def _command(w: Workload) -> Command:
    assert w.command is not None, "of() gives CommandKind only to a workload with a command"
    return w.command


def _server(w: Workload) -> Server:
    assert w.command is not None and w.command.server is not None, "of() gives ServerKind"
    return w.command.server


MODEL: Kind = ModelKind()
COMMAND: Kind = CommandKind()
SERVER: Kind = ServerKind()
