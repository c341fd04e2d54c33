"""The pull's steps, run in the worker process that node.py supervises.

Per workload: resolve its manifest for this node's fingerprint, refuse a replay, check
free space, download and verify its blobs, then install them with one swap. The worker
decides nothing about fail-open or fail-closed: it reports facts to the supervisor over
a pipe (`Channel`), one JSON message per line, and asks before every swap ("commit?"),
so that the supervisor alone decides whether the deadline still allows it.

Fail-open (the default): each workload is installed on its own, so one that fails
leaves the others warm. Fail-closed (`require`): every workload is fetched first and
all are installed in one swap, so a failure installs nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchwarm import errors, formats
from torchwarm.config import Config, Workload
from torchwarm.env import fingerprint
from torchwarm.errors import InstallError, NoCacheForFingerprint, TorchwarmError, one_line
from torchwarm.node import fetch, install
from torchwarm.node import precompile_rules as precompile
from torchwarm.node.replay import Memory
from torchwarm.node.report import WorkloadOutcome
from torchwarm.node.resolve import Miss, resolve
from torchwarm.spec.manifest import Manifest
from torchwarm.stores import Store

log = logging.getLogger(__name__)


class PullFailed(TorchwarmError):
    """A fail-closed pull stopped by something outside torchwarm's own errors (a bug)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Failure:
    """Why a workload was not installed: the error's class name, exit code and one line."""

    kind: str
    exit_code: int
    message: str

    def error(self) -> TorchwarmError:
        """The error to raise in the supervisor (fail-closed): the worker's own class."""
        found = getattr(errors, self.kind, None)
        if isinstance(found, type) and issubclass(found, TorchwarmError):
            error = found.__new__(found)  # its message as sent, whatever its __init__ takes
            Exception.__init__(error, self.message)
            return error
        return PullFailed(self.message, self.exit_code)

    @classmethod
    def of(cls, e: BaseException) -> Failure:
        if isinstance(e, TorchwarmError):
            return cls(type(e).__name__, e.exit_code, one_line(str(e)))
        if isinstance(e, OSError):  # this node's disk or files: a full disk, an I/O error
            where = f" ({e.filename})" if e.filename else ""
            return cls(
                "InstallError",
                InstallError.exit_code,
                one_line(f"I/O error on this node: {e.strerror or e}{where}"),
            )
        return cls("InternalError", 1, one_line(f"internal error: {type(e).__name__}: {e} (a bug)"))


class Channel:
    """The worker's end of the pipes to the supervisor."""

    def __init__(self, out_fd: int, in_fd: int) -> None:
        self.out = out_fd
        self.inp = in_fd

    def send(self, kind: str, **fields: Any) -> None:
        data = (json.dumps({"t": kind, **fields}, default=str) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.out, view) :]

    def may_commit(self, names: list[str]) -> bool:
        """Ask the supervisor whether a swap may start; it answers, or kills this process."""
        self.send("commit?", workloads=names)
        return os.read(self.inp, 3) == b"go\n"


Hit = tuple[Manifest, dict[str, Path]]


class PullJob:
    def __init__(self, cfg: Config, workloads: tuple[Workload, ...], require: bool,
                 chan: Channel) -> None:  # fmt: skip
        self.cfg, self.workloads, self.require, self.chan = cfg, workloads, require, chan

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # noqa: BLE001 - every workload not yet settled fails with it
            self.chan.send("fatal", failure=Failure.of(e).__dict__)
        self.chan.send("done")

    def _run(self) -> None:
        self.chan.send("phase", phase="taking the install lock")
        with install.locked(self.cfg.cache_dir) as work:
            self.memory = Memory(work)
            self.chan.send("phase", phase="reading this machine's fingerprint")
            t0 = time.perf_counter()
            fields = fingerprint.collect()
            self.fields = fields
            self.chan.send("fingerprint", digest=fingerprint.digest(fields),
                           seconds=time.perf_counter() - t0)  # fmt: skip
            store = self.cfg.open_store(read_only=True)  # a node never writes to the store
            downloads = work / f"downloads-{os.getpid()}"
            try:
                downloads.mkdir(parents=True, exist_ok=True)
                if self.require:
                    self._all_or_nothing(store, downloads)
                else:
                    self._each_on_its_own(store, downloads)
            finally:
                shutil.rmtree(downloads, ignore_errors=True)

    # -- the two modes ----------------------------------------------------------------

    def _each_on_its_own(self, store: Store, downloads: Path) -> None:
        found = self._resolve_all(store, stop_at_failure=False)
        manifests = [m for _, m in found]
        for w, m in found:
            target = downloads / w.name
            try:
                self._space(downloads, [m])
                self._install([(m, self._fetch(store, w, m, target))], manifests)
            except Exception as e:  # noqa: BLE001 - this workload fails; the others go on
                self._failed(w, e)
            finally:
                shutil.rmtree(target, ignore_errors=True)

    def _all_or_nothing(self, store: Store, downloads: Path) -> None:
        found = self._resolve_all(store, stop_at_failure=True)
        if len(found) < len(self.workloads):
            return  # one failed (and said so): fail-closed installs nothing
        manifests = [m for _, m in found]
        hits: list[Hit] = []
        for i, (w, m) in enumerate(found):
            try:
                if i == 0:
                    self._space(downloads, manifests)  # all of them, before the first byte
                hits.append((m, self._fetch(store, w, m, downloads / w.name)))
            except Exception as e:  # noqa: BLE001 - fail-closed: stop at the first failure
                self._failed(w, e)
                return
        self._install(hits, manifests)

    # -- the steps ----------------------------------------------------------------------

    def _failed(self, w: Workload, e: BaseException) -> None:
        self.chan.send("failed", workload=w.name, failure=Failure.of(e).__dict__)

    def _resolve_all(self, store: Store, stop_at_failure: bool) -> list[tuple[Workload, Manifest]]:
        """Each workload's verified manifest for this fingerprint, not older than what this
        node installed before; a workload that has none fails (and is left out)."""
        found = []
        for w in self.workloads:
            self.chan.send("phase", phase=f"resolving {w.name!r} in {store.url}")
            try:
                t0 = time.perf_counter()
                m = resolve(store, w.name, self.fields, self.cfg.trusted_keys)
                self.chan.send("timing", name=f"resolve_s.{w.name}",
                               seconds=time.perf_counter() - t0)  # fmt: skip
                if isinstance(m, Miss):
                    raise NoCacheForFingerprint(m.reason)
                self.memory.check(m, store.url)
            except Exception as e:  # noqa: BLE001 - said per workload
                self._failed(w, e)
                if stop_at_failure:
                    break
                continue
            found.append((w, m))
        return found

    def _fetch(self, store: Store, w: Workload, m: Manifest, dest: Path) -> dict[str, Path]:
        """Download and verify one workload's blobs into `dest`."""
        dest.mkdir(parents=True, exist_ok=True)
        self.chan.send("phase", phase=f"downloading {w.name!r} ({m.size} bytes) from "
                       f"{store.url}")  # fmt: skip
        t0 = time.perf_counter()
        blobs = fetch.fetch(store, m, dest)
        self.chan.send("timing", name=f"fetch_s.{w.name}", seconds=time.perf_counter() - t0)
        return blobs

    def _space(self, where: Path, manifests: list[Manifest]) -> None:
        """Refuse to start a download that the filesystem cannot hold, unpacked included."""
        download = sum(m.size for m in manifests)
        unpacked = sum(unpacked_bytes(m) for m in manifests)
        st = os.statvfs(where)
        free = st.f_bavail * st.f_frsize
        if download + unpacked > free:
            names = ", ".join(m.workload for m in manifests)
            raise InstallError(
                f"not enough free space for {names} in {self.cfg.cache_dir.parent}: "
                f"{download + unpacked} bytes needed ({download} to download, {unpacked} "
                f"unpacked), {free} available; enlarge the cache volume"
            )

    def _install(self, hits: list[Hit], pulled: list[Manifest]) -> None:
        """Swap the hits in together. A precompile capture brings its precompiled entries
        only where precompile.decide() allows (`pulled`: every manifest of this pull)."""
        names = [m.workload for m, _ in hits]
        by_name = {w.name: w for w in self.workloads}
        decided = {
            m.workload: precompile.decide(m, by_name[m.workload], [o for o in pulled if o is not m])
            for m, _ in hits
            if m.format == precompile.FORMAT
        }

        def fill(staging: Path) -> None:
            for m, blobs in hits:
                entries = m.workload in decided and decided[m.workload].install
                formats.get(m.format).install(blobs, staging, precompiled=entries)

        self.chan.send("phase", phase=f"installing {', '.join(names)}")
        t0 = time.perf_counter()
        install.install(self.cfg.cache_dir, fill, before_swap=lambda: self._commit(names))
        try:
            self.memory.record([m for m, _ in hits])
        except OSError as e:  # installed all the same: only the replay memory is lost
            log.warning("cannot remember the installed serials (%s); replay protection "
                        "restarts from the next pull that can", e)  # fmt: skip
        self.chan.send("timing", name=f"install_s.{'+'.join(names)}",
                       seconds=time.perf_counter() - t0)  # fmt: skip
        for m, _ in hits:
            d = decided.get(m.workload)
            outcome = WorkloadOutcome(
                m.workload, "warm", "", f"{m.workload}/{m.fingerprint_digest}", m.format,
                [b.to_dict() for b in m.blobs], m.size, _warmup_summary(m),
                precompiled=bool(d and d.install),
                precompile_reason=d.reason if d is not None and not d.install else "",
            )  # fmt: skip
            self.chan.send("installed", outcome=outcome.__dict__)

    def _commit(self, names: list[str]) -> None:
        if not self.chan.may_commit(names):
            raise InstallError("the supervisor refused the swap")  # not reached: it kills us


def unpacked_bytes(m: Manifest) -> int:
    """Bytes the manifest's blobs take once installed, as the seed recorded them (0: unknown)."""
    n = m.warmup.get("unpacked_bytes")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0


def _warmup_summary(m: Manifest) -> dict[str, Any]:
    """What the seed's warm-up saw, kept in the marker to compare with what the app does."""
    keep = ("counters", "first_call_s", "so_files", "input_sets")
    return {k: m.warmup[k] for k in keep if k in m.warmup}
