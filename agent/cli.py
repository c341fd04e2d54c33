"""`torchwarm`: the command line. Each command is a thin layer over one module.

Exit codes (one place; README "Exit codes" mirrors this table):
    0  success; also a fail-open pull that starts cold (it says why in one line)
    1  internal error (a bug: please report it)
    2  bad config, environment variable or command-line usage
    3  store unreachable or answered something unusable
    4  verification failed: digest, size or manifest refused; nothing installed
    5  no cache for this workload and fingerprint (pull --require)
    6  the cache could not be installed into the cache directory
    7  a warm-up failed to compile or capture, or ran past warmup_timeout_s;
       daemon --once: a workload failed, for any reason (an error outside every
       workload, such as the fingerprint or the store, exits with that error's code)
    8  wait: the ready marker did not appear in time
    9  the pull did not finish within its deadline (--require)
  130  interrupted
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from torchwarm import __version__
from torchwarm import config as cfgmod
from torchwarm.errors import Cancelled, TorchwarmError, WarmupError, printable

if TYPE_CHECKING:
    from torchwarm.seed.warmup import WarmupResult

EXIT_INTERNAL = 1
EXIT_USAGE = 2
STARTED = time.monotonic()  # the pull deadline counts from here: imports included


def main(argv: Sequence[str] | None = None) -> int:
    # torch warns at import when numpy is absent; torchwarm needs no numpy, so that
    # line is noise in a tool whose errors must be one line.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    parser = _parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_PrintableFormatter("torchwarm: %(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        handlers=[handler])  # fmt: skip
    try:
        return int(args.func(args) or 0)
    except TorchwarmError as e:
        _say(f"torchwarm: error: {e}", sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("torchwarm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place a bug becomes one line
        if args.verbose:
            raise
        _say(
            f"torchwarm: internal error: {type(e).__name__}: {e} "
            "(run with -v for the traceback and report it)",
            sys.stderr,
        )
        return EXIT_INTERNAL


def _say(line: str, file: TextIO | None = None) -> None:
    """Print one line for people, escaped (errors.printable): what torchwarm says quotes the
    store, its server, manifests, the config and the environment, which may hold terminal
    escapes. JSON output needs none of this: json.dumps escapes every control character."""
    print(printable(line), file=file)


class _PrintableFormatter(logging.Formatter):
    """Log lines escaped as _say's are (a retry's line quotes the store server's answer)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return printable(super().formatMessage(record))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchwarm",
        description="Ship torch.compile caches from a warm seed machine to every new node.",
        epilog="Exit codes: 0 ok (a fail-open pull that starts cold included), 1 internal "
        "error, 2 bad config or usage, 3 store error, 4 verification failed, 5 no cache "
        "for this fingerprint (--require), 6 install failed, 7 warm-up failed or timed out "
        "(daemon --once: a workload failed), "
        "8 wait timed out, 9 pull deadline passed (--require).",
    )
    p.add_argument("--version", action="version", version=f"torchwarm {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, func: Callable[[argparse.Namespace], int], help: str, config: bool = True):
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        if config:
            sp.add_argument("-c", "--config", required=True, help="the YAML config file")
            sp.add_argument("--store", help="store URL (overrides the config and TORCHWARM_STORE)")
        return sp

    fp = cmd("fingerprint", _fingerprint, "print this machine's environment fingerprint",
             config=False)  # fmt: skip
    fp.add_argument("--json", action="store_true", help="print the fields as JSON")
    fp.add_argument("--sources", action="store_true", help="say where each field is read from")
    fp.add_argument("--torch", action="store_true",
                    help="also print what torch itself says (imports torch: slow)")  # fmt: skip

    kg = cmd("keygen", _keygen, "write an ed25519 key pair for signing manifests (a seed key, "
             "or a node key for node publishes)",
             config=False)  # fmt: skip
    kg.add_argument("name", help="key name, e.g. seed-1 (bump the number when rotating)")
    kg.add_argument("--out", type=Path, default=Path("."), help="folder (default: here)")

    wu = cmd("warmup", _warmup, "compile workloads in fresh subprocesses and capture their caches")
    wu.add_argument("--workload", help="only this workload (default: all)")
    wu.add_argument("--format", choices=cfgmod.FORMATS, help="capture format (default: config)")
    wu.add_argument("--push", action="store_true", help="publish to the store right away")
    wu.add_argument("--out", type=Path, help="keep the captures in this folder (for `push`)")

    pu = cmd("push", _push, "publish warm-up captures kept with `warmup --out`")
    pu.add_argument("--from", dest="source", type=Path, required=True, help="the --out folder")
    pu.add_argument("--workload", help="only this workload (default: all in the folder)")

    pl = cmd("pull", _pull, "install the verified cache for this node's fingerprint, then "
             "write the ready marker")  # fmt: skip
    pl.add_argument("--workload", help="only this workload (default: all)")
    pl.add_argument("--json", action="store_true", help="print the pull report as JSON")
    _pull_options(pl)

    rn = cmd("run", _run, "pull, then exec COMMAND (same PID; a child while precompiled "
             "entries are on, or with --publish) with TORCHINDUCTOR_CACHE_DIR set")  # fmt: skip
    rn.add_argument("--workload", help="only this workload (default: all)")
    _pull_options(rn)
    _publish_option(
        rn,
        "exited 0, or its ready_url answered 2xx and no new compile entry "
        "appeared for quiet_s; the app runs as a child, its exit code kept",
    )
    rn.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]",
                    help="the main process to exec after the pull")  # fmt: skip

    sv = cmd("serve", _serve, "native-sidecar mode: pull in the background, serve /readyz "
             "(503 until installed, then 200), /healthz and /metrics until SIGTERM")  # fmt: skip
    sv.add_argument("--workload", help="only this workload (default: all)")
    sv.add_argument("--listen", default="0.0.0.0:8477", help="HOST:PORT (default: 0.0.0.0:8477)")
    _pull_options(sv)
    _publish_option(
        sv,
        "is ready: publish.ready_url answers 2xx and no new compile entry "
        "appeared for quiet_s, or SIGTERM came after it was ready",
    )

    wt = cmd("wait", _wait, "block until the ready marker exists (main-process side)",
             config=False)  # fmt: skip
    wt.add_argument("--marker", type=Path, required=True, help="the ready marker path")
    wt.add_argument("--timeout", type=_seconds, default=600.0, help="seconds (default: 600)")

    dm = cmd("daemon", _daemon, "keep the store warm: warm up and publish every workload whose "
             "manifest is missing or stale, on an interval")  # fmt: skip
    dm.add_argument("--once", action="store_true", help="one pass, then exit (Jobs, CronJobs)")
    dm.add_argument("--workload", help="only this workload (default: all)")
    dm.add_argument("--listen", help="HOST:PORT for /metrics and /healthz (default: config)")

    gc = cmd("gc", _gc, "per workload, keep the newest N manifests (by serial) and every "
             "manifest younger than --older-than, delete the rest; then delete blobs no kept "
             "manifest names once older than the grace period")  # fmt: skip
    gc.add_argument("--keep", type=int, required=True,
                    help="manifests per workload always kept, newest first")  # fmt: skip
    gc.add_argument("--older-than", default="30d", metavar="DURATION",
                    help="delete a manifest beyond --keep only when its object is at least "
                    "this old, e.g. 30d, 12h, 3600s (default: 30d)")  # fmt: skip
    gc.add_argument("--grace", type=float, default=6 * 3600.0, metavar="SECONDS",
                    help="never delete a blob younger than this (default: 21600)")  # fmt: skip
    gc.add_argument("--dry-run", action="store_true", help="print what would go; delete nothing")

    ls = cmd("ls", _ls, "list what the store holds: workload, fingerprint, format, size, age")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")

    pr = cmd("probe", _probe, "compile workloads in this process against the cache dir and "
             "print first-call seconds and torch's cache hit/miss counters")  # fmt: skip
    pr.add_argument("--workload", help="only this workload (default: all)")
    pr.add_argument("--cache-dir", type=Path, help="use this cache dir (overrides the config)")
    pr.add_argument("--json", action="store_true", help="print the reports as JSON")
    return p


def _seconds(text: str) -> float:
    """argparse type: a finite number of seconds, 0 or more (`nan` once made wait wait
    forever: no time is past a deadline of nan)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds >= 0")
    return value


def _pull_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--cache-dir", type=Path, help="install here (overrides the config)")
    sp.add_argument("--marker", type=Path, help="ready marker path (overrides the config)")
    sp.add_argument("--require", action="store_true", default=None,
                    help="fail-closed: exit non-zero instead of starting cold")  # fmt: skip
    sp.add_argument("--deadline", type=float, metavar="SECONDS",
                    help="bound the whole pull (default: config deadline_s, 300)")  # fmt: skip


def _publish_option(sp: argparse.ArgumentParser, when: str) -> None:
    sp.add_argument("--publish", action="store_true", default=None,
                    help="where the pull left the workload cold for want of a cache for "
                    "this fingerprint, publish the app's cache dir (signed with the node "
                    f"key) once the app {when} (config: publish.mode)")  # fmt: skip


def _load(args: argparse.Namespace, **extra: object) -> cfgmod.Config:
    overrides = {"store": getattr(args, "store", None), **extra}
    return cfgmod.load(args.config, overrides)


def _fingerprint(args: argparse.Namespace) -> int:
    from torchwarm.env import fingerprint

    fields = fingerprint.collect()
    digest = fingerprint.digest(fields)
    if args.json:
        doc: dict[str, object] = {"digest": digest, "fields": fields}
        if args.torch:
            doc["torch_facts"] = fingerprint.torch_facts()
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    for k in sorted(fields):
        print(f"{k:20} {json.dumps(fields[k])}")
        if args.sources:
            print(f"{'':20} from: {fingerprint.SOURCES[k]}")
    print(f"{'digest':20} {digest}")
    if args.torch:
        print("torch's own facts (torch imported):")
        for k, v in sorted(fingerprint.torch_facts().items()):
            print(f"  {k:18} {json.dumps(v)}")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from torchwarm.spec import signing
    from torchwarm.util.fs import atomic_writer

    secret, public = signing.generate(args.name)
    secret_path, public_path = args.out / f"{args.name}.secret", args.out / f"{args.name}.pub"
    for path in (secret_path, public_path):
        if path.exists():
            raise cfgmod.ConfigError(f"{path} exists; choose another key name or folder")
    try:
        with atomic_writer(secret_path, mode=0o600) as f:
            f.write(secret.encode() + b"\n")
        with atomic_writer(public_path) as f:
            f.write(public.encode() + b"\n")
    except OSError as e:
        raise cfgmod.ConfigError(f"cannot write the key pair into {args.out}: {e}") from None
    print(
        f"secret key: {secret_path} (a seed's: signing_key_file or ${cfgmod.SIGNING_KEY_VAR}; "
        f"a node's: node_key_file or ${cfgmod.NODE_KEY_VAR})"
    )
    print(
        f"public key: {public_path} (on the nodes: trusted_keys for a seed key, "
        "trusted_node_keys for a node key; never both)"
    )
    print(public)
    return 0


def _warmup(args: argparse.Namespace) -> int:
    from torchwarm.seed import kinds
    from torchwarm.seed import warmup as wu

    cfg = _load(args, format=args.format)
    if not args.push and args.out is None:
        raise cfgmod.ConfigError("warmup needs --push, --out DIR, or both")
    root = args.out or Path(tempfile.mkdtemp(prefix="torchwarm-warmup-"))
    # SIGTERM (a Job deleted, a pod stopped) stops the warm-up as the daemon's stop does:
    # its process group is killed, a cache_dir lent at the node's path is put back, and
    # the exit is Cancelled's (130). A publish under way finishes first (blobs, then the
    # manifest), and no further workload starts.
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        for w in cfg.selected(args.workload):
            if stop.is_set():
                raise Cancelled(f"warm-up of {w.name!r} cancelled (SIGTERM) before it started")
            t0 = time.perf_counter()
            result = wu.warmup(cfg, w, root / w.name, stop=stop)
            _say(f"warmed {w.name}: {kinds.of(w).warmed(result.summary)}, "
                 f"{time.perf_counter() - t0:.1f} s in all")  # fmt: skip
            if args.push:
                _publish(cfg, result)
    except WarmupError:
        raise  # the log it names stays (in the temp folder without --out)
    except BaseException:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _push(args: argparse.Namespace) -> int:
    from torchwarm.seed import warmup as wu

    cfg = _load(args)
    dirs = [args.source / args.workload] if args.workload else sorted(
        d for d in args.source.iterdir() if (d / wu.RESULT).is_file()
    ) if args.source.is_dir() else []  # fmt: skip
    if not dirs:
        raise cfgmod.ConfigError(f"{args.source}: no warm-up results; run `warmup --out` first")
    for d in dirs:
        _publish(cfg, wu.WarmupResult.load(d))
    return 0


def _publish(cfg: cfgmod.Config, result: WarmupResult) -> None:
    from torchwarm.seed.publish import publish_warmup

    rep = publish_warmup(cfg.open_store(), result, cfg.signing_key)
    m = rep.manifest
    _say(
        f"pushed {m.workload} ({m.format}, {_size(m.size)}) as {rep.manifest_key}: "
        f"{rep.outcome}, {rep.blobs_uploaded} blob(s) uploaded ({_size(rep.bytes_uploaded)}), "
        f"{rep.blobs_present} already present"
    )


def _pull_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {"store": args.store, "cache_dir": _s(args.cache_dir), "marker": _s(args.marker),
            "deadline_s": args.deadline, "publish": getattr(args, "publish", None)}  # fmt: skip


def _pull(args: argparse.Namespace) -> int:
    from torchwarm.node import gate as node
    from torchwarm.node import report

    rep, _ = node.gate(args.config, _pull_overrides(args), args.workload, args.require,
                       started=STARTED)  # fmt: skip
    print(rep.to_json().decode() if args.json else "\n".join(report.describe(rep)))
    return 0


def _run(args: argparse.Namespace) -> int:
    from torchwarm import api
    from torchwarm.node import gate as node
    from torchwarm.node import precompile_rules as precompile
    from torchwarm.node import precompile_trial, report

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise cfgmod.ConfigError("run needs the main process after '--', e.g. -- python serve.py")
    rep, cfg = node.gate(args.config, _pull_overrides(args), args.workload, args.require,
                         started=STARTED)  # fmt: skip
    for line in report.describe(rep):
        print(f"torchwarm: {line}", file=sys.stderr)  # the app owns stdout
    sys.stderr.flush()
    sys.stdout.flush()
    env = api.app_env(rep)  # the cache dir, the config's env expanded for it, precompile
    for var in cfgmod.SECRET_VARS:
        env.pop(var, None)  # the app never holds a key that signs manifests
    trial, off = precompile_trial.begin(rep)
    if off:  # a start with the entries failed in this boot (or cannot be recorded)
        env.pop(precompile.ENV_VAR, None)
        _say(f"torchwarm: {off}", sys.stderr)
    seeder = None
    if cfg is not None and cfg.publish.on:
        from torchwarm.node import selfseed

        seeder = selfseed.prepare(cfg, rep, selfseed.stderr_line)
    sys.stderr.flush()
    try:
        if trial is None and seeder is None:
            for signo in precompile_trial.PYTHON_IGNORED:
                signal.signal(signo, signal.SIG_DFL)
            os.execvpe(argv[0], argv, env)
        # A child, to learn how it ends (the entries' trial) or to publish after it.
        started = seeder.start if seeder is not None else lambda: None
        ended = precompile_trial.supervise(trial, argv, env, spawned=started)
    except OSError as e:
        raise cfgmod.ConfigError(f"cannot exec {argv[0]!r}: {e.strerror}") from None
    if ended.failed and trial is not None:
        _say(f"torchwarm: the app {ended.how} with precompiled entries; its next start in "
             "this boot goes without them (FX-graph warm)", sys.stderr)  # fmt: skip
    if seeder is not None:
        # A second stop while publishing ends this process at once, as the app ended: the
        # publish never changes what whoever waits for `run` sees.
        def end_now(*_: object) -> None:
            os._exit(precompile_trial.die_by(ended.signo) if ended.signo else ended.code)

        for signo in precompile_trial.STOPS:
            signal.signal(signo, end_now)
        seeder.app_ended(ended.code, ended.how, ended.stopped)
    return precompile_trial.die_by(ended.signo) if ended.signo else ended.code


def _serve(args: argparse.Namespace) -> int:
    from torchwarm.node import sidecar

    return sidecar.serve(args.config, _pull_overrides(args), args.listen, args.workload,
                         args.require, STARTED)  # fmt: skip


def _wait(args: argparse.Namespace) -> int:
    from torchwarm.node import marker

    doc = marker.wait(args.marker, args.timeout)
    _say(f"ready: {doc.get('status', '?')}")
    return 0


def _daemon(args: argparse.Namespace) -> int:
    from torchwarm.seed.daemon import Daemon

    overrides = {"store": args.store}
    return Daemon(args.config, overrides, args.workload).run(args.once, args.listen)


def _gc(args: argparse.Namespace) -> int:
    from torchwarm.admin.gc import TEMP_RESERVE_BYTES, gc

    if args.keep < 1:
        raise cfgmod.ConfigError("--keep must be at least 1")
    if args.grace < 0:
        raise cfgmod.ConfigError("--grace must not be negative")
    older_than_s = cfgmod.parse_duration(args.older_than, "--older-than")
    cfg = _load(args)
    rep = gc(cfg.open_store(), args.keep, older_than_s, args.grace, args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for key in rep.deleted_manifests:
        _say(f"{verb} manifest {key}")
    for key in rep.deleted_blobs:
        _say(f"{verb} blob {key}")
    _say(
        f"kept {len(rep.kept_manifests)} manifest(s) ({rep.young_manifests} of them beyond "
        f"--keep but younger than {args.older_than}); {verb} {len(rep.deleted_manifests)} "
        f"manifest(s) and {len(rep.deleted_blobs)} blob(s) ({_size(rep.freed_bytes)}); "
        f"{rep.young_blobs} unreferenced blob(s) inside the grace period kept"
    )
    for key in rep.restored_blobs:
        _say(f"restored blob {key}: a manifest published during this gc names it")
    for key in rep.unheld_blobs:
        _say(f"kept blob {key}: no room in {rep.temp_dir} to hold a copy while deleting it "
             f"(gc leaves {_size(TEMP_RESERVE_BYTES)} free there); "
             "set TMPDIR to a larger disk")  # fmt: skip
    if rep.sweep_skipped:
        _say(f"blob sweep skipped: {rep.sweep_skipped}")
    return 0


def _ls(args: argparse.Namespace) -> int:
    from torchwarm.admin import ls as catalog

    cfg = _load(args)
    entries = catalog.entries(cfg.open_store())
    if args.json:
        for e in entries:
            print(json.dumps(e.to_dict(), sort_keys=True))
        return 0
    if not entries:
        _say(f"no manifests in {cfg.store}")
        return 0
    _say(f"{'WORKLOAD':20} {'FINGERPRINT':12} {'FORMAT':10} {'SIZE':>9} {'AGE':>6} "
         f"{'GRAPHS':>6} {'BY':4}  INPUT SETS OR COMMAND")  # fmt: skip
    for e in entries:
        c = e.counters
        # A command that printed no counters: unknown, not zero.
        graphs = (
            "-" if c is None else c.get("fxgraph_cache_miss", 0) + c.get("fxgraph_cache_hit", 0)
        )
        what = f"command: {shlex.join(e.command)}" if e.command is not None else e.input_sets
        if e.publisher != "seed":
            what = f"the app's own cache, signed by {e.signed_by}"
        _say(
            f"{e.workload:20} {e.fingerprint[:12]:12} {e.format:10} {_size(e.size):>9} "
            f"{_age(e.age_s):>6} {graphs:>6} {e.publisher:4}  {what}"
        )
    return 0


def _probe(args: argparse.Namespace) -> int:
    from torchwarm.env import torchenv

    cfg = _load(args, cache_dir=_s(args.cache_dir))
    with torchenv.torch_cache_dir(cfg.cache_dir, cfg.env):
        _probe_workloads(cfg, args)
    return 0


def _probe_workloads(cfg: cfgmod.Config, args: argparse.Namespace) -> None:
    from torchwarm.seed import kinds

    for w in cfg.selected(args.workload):
        probe = kinds.of(w).probe(cfg, w)  # a command: its warm-up run, on this cache dir
        if args.json:
            print(json.dumps(probe.doc, sort_keys=True))
        else:
            _say(probe.line)


def _s(p: Path | None) -> str | None:
    return None if p is None else str(p.resolve())


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


if __name__ == "__main__":
    sys.exit(main())
