"""Node publishes: the fleet seeds itself (README "The fleet seeds itself").

A node whose pull left its workload cold for want of a manifest (`publish: cold`, what
`run --publish` and `serve --publish` turn on), or, with `publish: misses`, installed a
node's publish that its app then added entries to, publishes the app's own cache dir
for its own fingerprint once the app is warm:

- its `ready_url` answers 2xx and no new compile entry appeared for `quiet_s`; or
- the app exited 0 (`run`: a batch job); or
- a stop came (SIGTERM) after the app had been ready: what is there, within the grace.

Never after an app that exited otherwise, nor on a stop before it was ready: a cache of
an app that never got warm is not published. The capture is the whole cache dir as
format `cachedir`, at the node's own path, so a cache that records its root is
path-exact by construction. It is signed with the node key and written as publish.py's
publish_node writes (blobs first, the manifest by a conditional create: the first node
wins, a seed's manifest is never replaced). A boot publishes a workload once: the
outcome is recorded beside the ready marker, and a later start in the same boot (a
restarted container) does not publish again.

The app comes first: nothing here delays its start or changes its exit code, and every
failure is one line (`publish: ...`) and a count on /metrics, never an exception.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torchwarm.config import Config
from torchwarm.env import fingerprint
from torchwarm.errors import TorchwarmError, one_line, printable
from torchwarm.node import install, marker, misses
from torchwarm.node.report import PullReport
from torchwarm.seed.server import http_check
from torchwarm.spec import archive
from torchwarm.spec import manifest as mf
from torchwarm.util.fs import atomic_write_json, read_json

log = logging.getLogger(__name__)

RECORD = "torchwarm-published.json"  # beside the ready marker: this boot's publishes
POLL_S = 1.0  # between readiness checks and scans of the cache dir, at least
CHECK_TIMEOUT_S = 2.0  # one readiness check
OUTCOMES = ("published", "skipped", "failed")  # torchwarm_publish_total{outcome}


@dataclass(frozen=True)
class Plan:
    """What this boot will publish, decided right after the pull."""

    workload: str
    why: str  # why it publishes (for the manifest and the line)
    replaces: int | None  # the serial of the node manifest it replaces (misses: the one
    # installed; cold: the one refused here); None: it only creates
    baseline: frozenset[str]  # misses: the compile entries installed (cold: none)


def plan(cfg: Config | None, report: PullReport, serve: bool = False) -> tuple[Plan | None, str]:
    """The publish this boot will make, if any; else None and why not ("" when there is
    nothing to say: publishing is off, or the workload is warm from a seed). `serve`: the
    sidecar, which sees the app only through its ready_url."""
    if cfg is None or not cfg.publish.on:
        return None, ""
    if serve and cfg.publish.ready_url is None:
        return None, ("off: serve --publish learns that the app is warm from its readiness "
                      "endpoint; set publish.ready_url (http://127.0.0.1:PORT/PATH)")  # fmt: skip
    if cfg.node_key is None:
        return None, ("off: no node key; set node_key_file or $TORCHWARM_NODE_KEY (make one "
                      "with `torchwarm keygen node-1`)")  # fmt: skip
    if len(report.workloads) != 1:
        return None, ("off: a node publishes its whole cache dir for one workload, and "
                      f"{len(report.workloads)} are selected; pass --workload NAME")  # fmt: skip
    o = report.workloads[0]
    if _published_in_this_boot(cfg, o.workload):
        return None, f"not for {o.workload}: it was published in this boot already"
    if o.status == "cold":
        if o.refused_node is not None and _trusts_itself(cfg):
            # A node's publish it refuses (a rotated-out key, say): replacing it is what
            # keeps the fingerprint from staying cold until someone deletes it.
            why = "the node manifest stored for this fingerprint is refused here"
            return Plan(o.workload, why, o.refused_node, frozenset()), ""
        if not o.no_cache:
            return None, (f"not for {o.workload}: it starts cold for another reason than a "
                          "missing cache (see the pull's line)")  # fmt: skip
        return Plan(o.workload, "no cache for this fingerprint", None, frozenset()), ""
    if cfg.publish.mode == "misses" and o.publisher == mf.NODE:
        # The entries installed, scanned before the app starts: what it adds is new.
        baseline = frozenset(misses.scan(Path(report.cache_dir)))
        return Plan(o.workload, "the app added entries", o.serial, baseline), ""
    if cfg.publish.mode == "misses":
        return None, f"not for {o.workload}: a seed published its cache; a node never replaces it"
    return None, ""


def _trusts_itself(cfg: Config) -> bool:
    """Whether this node takes what it publishes: its node key is in trusted_node_keys (a
    node that does not would replace every node's publish with one it refuses too)."""
    mine = cfg.node_key.public_raw() if cfg.node_key is not None else None
    return any(k.public_bytes_raw() == mine for k in cfg.trusted_node_keys.keys.values())


class Seeder:
    """Watches the app for warmth and publishes once (a thread of its own while the app
    runs; the stop or the app's end may publish from the caller's thread)."""

    def __init__(self, cfg: Config, plan: Plan, report: PullReport,
                 say: Callable[[str], None]) -> None:  # fmt: skip
        self.cfg, self.plan, self.report = cfg, plan, report
        self.cache_dir = Path(report.cache_dir)
        self.say = say
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.ready_seen = False
        self._once = threading.Lock()
        self._done = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Seeder:
        """Watch readiness and quiet, where there is a ready_url (else only the app's end
        or a stop can publish)."""
        if self.cfg.publish.ready_url is None:
            return self
        thread = threading.Thread(target=self._watch, name="torchwarm-publish", daemon=True)
        try:
            thread.start()
        except RuntimeError as e:  # no thread to be had (a full pids cgroup): the app runs on
            self.counts["failed"] += 1
            self.say(f"publish: cannot watch the app for readiness ({e}); only its exit 0 "
                     "(run) can publish now")  # fmt: skip
        else:
            self._thread = thread
        return self

    def app_ended(self, code: int, how: str, stopped: str) -> None:
        """`run`: the app ended with `code` (`how`: in words, "was killed by SIGKILL");
        `stopped` names the stop signal passed on to it, if any. Exit 0 without a stop, or
        a stop after readiness, publishes now."""
        self._stop.set()
        self._join()
        if stopped:
            self.stopping(f"{stopped} came")
        elif code == 0:
            self.publish("the app exited 0")
        else:
            self._not(f"the app {how}")

    def stopping(self, what: str = "SIGTERM came") -> None:
        """A stop came: publish what is there if the app was ready, else nothing."""
        self._stop.set()
        self._join()
        if self.ready_seen:
            self.publish(f"{what} after the app was ready")
        else:
            self._not(f"{what} before the app was ready")

    def publish(self, trigger: str) -> None:
        """Capture and publish, once; every outcome is one line and a count."""
        with self._once:
            if self._done:
                return
            self._done = True
            outcome, line = self._publish(trigger)
            self.counts[outcome] += 1
            self.say(f"publish: {line}")
            if outcome == "published":  # at most one per boot; a skip or a failure
                self._record(outcome)  # leaves a later start free to publish

    # -- the watch and the publish ------------------------------------------------------

    def _watch(self) -> None:
        try:
            self._watch_until_warm()
        except Exception as e:  # noqa: BLE001 - a watch that fails must not touch the app
            self.counts["failed"] += 1
            self.say(f"publish: watch stopped: {one_line(f'{type(e).__name__}: {e}')}")

    def _watch_until_warm(self) -> None:
        opts = self.cfg.publish
        url = urllib.parse.urlsplit(opts.ready_url or "")
        target = url.path or "/"
        if url.query:
            target += f"?{url.query}"
        seen = set(self.plan.baseline)
        changed = time.monotonic()
        interval = POLL_S
        while not self._stop.wait(interval):
            if http_check(url.hostname or "", url.port or 80, target, CHECK_TIMEOUT_S) is None:
                self.ready_seen = True
            t0 = time.monotonic()
            entries = set(misses.scan(self.cache_dir))
            spent = time.monotonic() - t0
            interval = max(POLL_S, spent / misses.MAX_DUTY)  # a large tree: scan less often
            if entries != seen:
                seen, changed = entries, time.monotonic()
            quiet = time.monotonic() - changed >= opts.quiet_s
            if self.ready_seen and quiet and self._worth(entries):
                self.publish(f"the app was ready and wrote no compile entry for "
                             f"{opts.quiet_s:g} s")  # fmt: skip
                return

    def _worth(self, entries: set[str]) -> bool:
        """Whether the cache dir holds what a publish is for: entries beyond the baseline
        (misses: the installed ones; else none, so any entry)."""
        return bool(entries - self.plan.baseline)

    def _publish(self, trigger: str) -> tuple[str, str]:
        try:
            return self._capture_and_publish(trigger)
        except Exception as e:  # noqa: BLE001 - a failed publish is one line, never the app's
            what = str(e) if isinstance(e, TorchwarmError) else f"{type(e).__name__}: {e}"
            return "failed", f"failed for {self.plan.workload}: {one_line(what)}"

    def _capture_and_publish(self, trigger: str) -> tuple[str, str]:
        from torchwarm import formats
        from torchwarm.seed.publish import build_manifest, publish_node

        name, opts = self.plan.workload, self.cfg.publish
        entries = set(misses.scan(self.cache_dir))
        if not self._worth(entries):
            return "skipped", f"not for {name}: {trigger}, but the app wrote no new compile entry"
        fields = fingerprint.collect()
        if fingerprint.digest(fields) != self.report.fingerprint:
            return "skipped", (f"not for {name}: this machine's fingerprint changed since the "
                               "pull")  # fmt: skip
        fmt = formats.get("cachedir")
        # Under the install lock: no pull swaps the tree while it is read, and a capture
        # left by a killed publisher is deleted by the next pull's recovery.
        with install.locked(self.cache_dir) as work:
            unpacked = fmt.unpacked_bytes(self.cache_dir)
            if unpacked > opts.max_bytes:
                return "skipped", (f"not for {name}: the cache dir holds {unpacked} bytes, over "
                                   f"publish.max_bytes ({opts.max_bytes})")  # fmt: skip
            out = work / f"staging-publish-{name}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            try:
                captured = fmt.capture(self.cache_dir, out)
                for c in captured:  # as a node checks it: what every node refuses stays out
                    archive.members(c.path)
                warmup = {"captured_from": "app", "reason": self.plan.why, "trigger": trigger,
                          "unpacked_bytes": unpacked, "entries": len(entries),
                          "warmed_at": str(self.cache_dir)}  # fmt: skip
                m, files = build_manifest(name, fields, "cachedir", captured, warmup)
                if m.size > opts.max_bytes:
                    return "skipped", (f"not for {name}: its blob is {m.size} bytes, over "
                                       f"publish.max_bytes ({opts.max_bytes})")  # fmt: skip
                assert self.cfg.node_key is not None  # plan() checked it
                rep = publish_node(self.cfg.open_store(), m, files, self.cfg.node_key,
                                   self.plan.replaces)  # fmt: skip
            finally:
                shutil.rmtree(out, ignore_errors=True)
        if rep.outcome == "skipped":
            return "skipped", f"not for {name}: {rep.reason}"
        return "published", (f"{rep.outcome} {name} ({trigger}): {len(entries)} compile "
                             f"entries, {rep.manifest.size} bytes as {rep.manifest_key}, "
                             f"signed by {self.cfg.node_key.name}")  # fmt: skip

    def _not(self, why: str) -> None:
        with self._once:
            if self._done:
                return
            self._done = True
        self.say(f"publish: nothing published for {self.plan.workload}: {why}")

    def _join(self) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _record(self, outcome: str) -> None:
        path = _record_path(self.cfg)
        doc = _this_boot(path)
        doc[self.plan.workload] = outcome
        try:
            atomic_write_json(path, {"boot_id": marker.boot_id(), "published": doc})
        except OSError as e:  # only the once-per-boot memory is lost
            log.warning("cannot record the publish in %s (%s)", path, e.strerror or e)


def _record_path(cfg: Config) -> Path:
    return cfg.marker_path.parent / RECORD


def _this_boot(path: Path) -> dict[str, str]:
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("boot_id") != marker.boot_id():
        return {}
    published = doc.get("published")
    if not isinstance(published, dict):
        return {}
    return {k: v for k, v in published.items() if isinstance(v, str)}


def _published_in_this_boot(cfg: Config, workload: str) -> bool:
    return workload in _this_boot(_record_path(cfg))


def prepare(cfg: Config | None, report: PullReport, say: Callable[[str], None],
            serve: bool = False) -> Seeder | None:  # fmt: skip
    """After the pull: the Seeder of this boot's publish (to start once the app has
    started), or None, with one line on why not where there is something to say. Never
    raises."""
    try:
        p, why = plan(cfg, report, serve)
    except Exception as e:  # noqa: BLE001 - deciding must not stop the app either
        p, why = None, f"off: {one_line(f'{type(e).__name__}: {e}')}"
    if why:
        say(f"publish: {why}")
    if p is None or cfg is None:
        return None
    return Seeder(cfg, p, report, say)


def stderr_line(line: str) -> None:
    """How `run` says a publish line: on stderr (the app owns stdout), escaped."""
    with contextlib.suppress(OSError, ValueError):
        print(printable(f"torchwarm: {line}"), file=sys.stderr, flush=True)
