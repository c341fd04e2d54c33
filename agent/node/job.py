"""The pull's steps, run in the worker process that node/gate.py supervises.

Per workload: resolve its manifest for this node's fingerprint, refuse a replay, check
free space, download and verify its blobs, then install them with one swap. The worker
decides nothing about fail-open or fail-closed: it reports facts to the gate over a pipe
(node/messages.py), and asks before every swap (MayCommit), so that the gate alone
decides whether the deadline still allows it.

The new tree is exactly the manifests' trees: the workloads installed now, and what the
other workloads of the tree in place installed (install.py records it), less a share
installed unsigned or by a key this node no longer trusts, once it has trusted keys.

The order around a swap: remember the manifests' serials (replay memory), ask, rename,
report Installed, and only then delete the previous tree. The rename is the commit
point: a worker stopped after it has installed the workload, and the previous tree it
did not get to delete is removed by the next pull (install._recover).

Fail-open (the default): each workload is installed on its own, so one that fails
leaves the others warm. Fail-closed (`require`): every workload is fetched first and
all are installed in one swap, so a failure installs nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torchwarm import formats
from torchwarm.config import Config, Workload
from torchwarm.env import fingerprint
from torchwarm.errors import InstallError, NoCacheForFingerprint
from torchwarm.node import fetch, install
from torchwarm.node import precompile_rules as precompile
from torchwarm.node.messages import (
    Channel,
    Done,
    Failed,
    Fatal,
    Fingerprinted,
    Installed,
    Phase,
    Timing,
    as_error,
)
from torchwarm.node.replay import Memory
from torchwarm.node.report import WorkloadOutcome
from torchwarm.node.resolve import Miss, resolve
from torchwarm.spec.manifest import Manifest
from torchwarm.stores import Store

log = logging.getLogger(__name__)


Hit = tuple[Manifest, dict[str, Path]]


class PullJob:
    def __init__(self, cfg: Config, workloads: tuple[Workload, ...], require: bool,
                 chan: Channel) -> None:  # fmt: skip
        self.cfg, self.workloads, self.require, self.chan = cfg, workloads, require, chan

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # noqa: BLE001 - every workload not yet settled fails with it
            self.chan.send(Fatal(as_error(e)))
        self.chan.send(Done())

    def _run(self) -> None:
        self.chan.send(Phase("taking the install lock"))
        with install.locked(self.cfg.cache_dir) as work:
            self.memory = Memory(work, self.cfg.trusted_keys)
            self.chan.send(Phase("reading this machine's fingerprint"))
            t0 = time.perf_counter()
            fields = fingerprint.collect()
            self.fields = fields
            self.chan.send(Fingerprinted(fingerprint.digest(fields), time.perf_counter() - t0))
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
        self.chan.send(Failed(w.name, as_error(e)))

    def _resolve_all(self, store: Store, stop_at_failure: bool) -> list[tuple[Workload, Manifest]]:
        """Each workload's verified manifest for this fingerprint, not older than what this
        node installed before; a workload that has none fails (and is left out)."""
        found = []
        for w in self.workloads:
            self.chan.send(Phase(f"resolving {w.name!r} in {store.url}"))
            try:
                t0 = time.perf_counter()
                m = resolve(store, w.name, self.fields, self.cfg.trusted_keys)
                self.chan.send(Timing(f"resolve_s.{w.name}", time.perf_counter() - t0))
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
        self.chan.send(Phase(f"downloading {w.name!r} ({m.size} bytes) from {store.url}"))
        t0 = time.perf_counter()
        blobs = fetch.fetch(store, m, dest)
        self.chan.send(Timing(f"fetch_s.{w.name}", time.perf_counter() - t0))
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
        outcomes = [_outcome(m, decided.get(m.workload)) for m, _ in hits]

        def part(m: Manifest, blobs: dict[str, Path]) -> install.Part:
            def fill(folder: Path) -> None:
                entries = m.workload in decided and decided[m.workload].install
                formats.get(m.format).install(blobs, folder, precompiled=entries)

            about = {"manifest": f"{m.workload}/{m.fingerprint_digest}", "serial": m.serial,
                     "signer": m.signer if self.cfg.trusted_keys else None}  # fmt: skip
            return install.Part(m.workload, fill, about)

        def commit(staging: Path) -> None:
            # Memory first, tree second: a tree in the cache dir always has its serials
            # remembered; a swap refused after this only refuses manifests older than
            # one this node verified, as the swap would have.
            self._remember([m for m, _ in hits])
            st = os.stat(staging)
            if not self.chan.may_commit(outcomes, (st.st_dev, st.st_ino)):
                raise InstallError("the gate refused the swap")  # not reached: it kills us

        def committed() -> None:
            self.chan.send(Timing(f"install_s.{'+'.join(names)}", time.perf_counter() - t0))
            for o in outcomes:
                self.chan.send(Installed(o))
            self.chan.send(Phase(f"deleting the cache tree that {', '.join(names)} replaced"))

        self.chan.send(Phase(f"installing {', '.join(names)}"))
        t0 = time.perf_counter()
        install.install(self.cfg.cache_dir, [part(m, blobs) for m, blobs in hits], keep=self._keep,
                        before_swap=commit, after_swap=committed)  # fmt: skip

    def _keep(self, name: str, about: Mapping[str, Any]) -> bool:
        """Whether another workload's share of the tree in place goes into the new tree:
        with trusted keys, only one that a key trusted now signed (`signer` is recorded
        only where it was verified)."""
        trusted = self.cfg.trusted_keys
        return not trusted or about.get("signer") in trusted.keys

    def _remember(self, manifests: list[Manifest]) -> None:
        try:
            self.memory.record(manifests)
        except OSError as e:  # the install goes on: only the replay memory is lost
            log.warning("cannot remember the installed serials (%s); replay protection "
                        "restarts from the next pull that can", e)  # fmt: skip


def _outcome(m: Manifest, d: precompile.Decision | None) -> WorkloadOutcome:
    """What the workload is once its tree is in (d: the precompile decision, if any)."""
    return WorkloadOutcome(
        m.workload, "warm", "", f"{m.workload}/{m.fingerprint_digest}", m.format,
        [b.to_dict() for b in m.blobs], m.size, _warmup_summary(m),
        precompiled=bool(d and d.install),
        precompile_reason=d.reason if d is not None and not d.install else "",
    )  # fmt: skip


def unpacked_bytes(m: Manifest) -> int:
    """Bytes the manifest's blobs take once installed, as the seed recorded them (0: unknown)."""
    n = m.warmup.get("unpacked_bytes")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0


def _warmup_summary(m: Manifest) -> dict[str, Any]:
    """What the seed's warm-up saw, kept in the marker to compare with what the app does."""
    keep = ("counters", "first_call_s", "so_files", "input_sets", "warmed_at")
    return {k: m.warmup[k] for k in keep if k in m.warmup}
