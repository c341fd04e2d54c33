"""The pull's steps, run in the worker process that node/gate.py supervises.

Per workload: resolve its manifest for this node's fingerprint, refuse a replay, check
free space, stream its blobs from the store into a staging folder (node/fetch.py:
download, sha256, zstd and tar in one pass, verified before the fill returns); then all
of them are installed with one swap. The worker
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

Fail-open (the default): a workload that fails is left out of the swap, so it leaves
the others warm. Fail-closed (`require`): the first failure stops the pull, and nothing
is installed. Either way a pull links the rest of the tree in place and syncs the volume
once, whatever the number of workloads.

A blob whose digest fails is streamed once more from byte 0 before it is believed: bytes
damaged in transit differ the second time, a damaged stored copy does not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torchwarm import formats
from torchwarm.config import Config, Workload
from torchwarm.env import fingerprint
from torchwarm.errors import InstallError, IntegrityError, NoCacheForFingerprint, ObjectTooLarge
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
from torchwarm.spec.manifest import NODE, Manifest
from torchwarm.spec.signing import TrustedKeys
from torchwarm.stores import Store
from torchwarm.util.fs import remove_tree

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Fail-closed: a workload failed (and said so); nothing is installed."""


class PullJob:
    def __init__(self, cfg: Config, workloads: tuple[Workload, ...], require: bool,
                 chan: Channel) -> None:  # fmt: skip
        self.cfg, self.workloads, self.require, self.chan = cfg, workloads, require, chan
        self.filled = 0.0  # when the last fill ended (install_s counts from it)
        self.work = Path()  # the workdir, once the install lock is held

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # noqa: BLE001 - every workload not yet settled fails with it
            self.chan.send(Fatal(as_error(e)))
        self.chan.send(Done())

    def _run(self) -> None:
        self.chan.send(Phase("taking the install lock"))
        with install.locked(self.cfg.cache_dir) as work:
            self.memory = Memory(work, self._trusted_all())
            self.chan.send(Phase("reading this machine's fingerprint"))
            t0 = time.perf_counter()
            fields = fingerprint.collect()
            self.fields = fields
            self.chan.send(Fingerprinted(fingerprint.digest(fields), time.perf_counter() - t0))
            store = self.cfg.open_store(read_only=True)  # a node never writes to the store
            self.work = work
            found = self._resolve_all(store, stop_at_failure=self.require)
            fetch.keep_partials(work, [b for _, m in found for b in m.blobs])
            if self.require and len(found) < len(self.workloads):
                return  # one failed (and said so): fail-closed installs nothing
            if not found:
                return
            if self.require:
                self._space(store, [m for _, m in found])  # all of them, before the first byte
            with contextlib.suppress(_Stop):  # it said which workload failed
                self._install(store, found)

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
                m = resolve(store, w.name, self.fields, self.cfg.trusted_keys,
                            self.cfg.trusted_node_keys)  # fmt: skip
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

    def _fill(self, store: Store, w: Workload, m: Manifest, folder: Path, entries: bool) -> None:
        """Stream one workload's blobs into `folder`; a blob whose digest fails once is
        streamed again from byte 0 (the folder emptied first)."""
        if not self.require:
            self._space(store, [m])  # what the other workloads staged is taken already
        self.chan.send(Phase(f"downloading and unpacking {w.name!r} ({m.size} bytes) from "
                             f"{store.url}"))  # fmt: skip
        t0 = time.perf_counter()
        fmt = formats.get(m.format)
        try:
            fmt.install(fetch.sources(store, m, self.work), folder, precompiled=entries)
        except ObjectTooLarge:
            raise  # the store said how large it is: asking again would only fetch more
        except IntegrityError as first:
            log.info("%s; downloading it once more", first)
            remove_tree(folder)
            folder.mkdir()
            fmt.install(fetch.sources(store, m, self.work), folder, precompiled=entries)
        self.filled = time.perf_counter()
        self.chan.send(Timing(f"fetch_s.{w.name}", self.filled - t0))

    def _space(self, store: Store, manifests: list[Manifest]) -> None:
        """Refuse to start a stream that the cache volume cannot hold: the unpacked trees
        (at least their blobs' size, for a manifest that does not say), and from a remote
        store the partial copies kept until each blob is verified."""
        unpacked = sum(max(unpacked_bytes(m), m.size) for m in manifests)
        kept = 0
        if store.capabilities.remote:
            blobs = [b for m in manifests for b in m.blobs]
            kept = sum(b.size - fetch.partial_bytes(self.work, b) for b in blobs)
        st = os.statvfs(self.work)
        free = st.f_bavail * st.f_frsize
        if unpacked + kept > free:
            names = ", ".join(m.workload for m in manifests)
            raise InstallError(
                f"not enough free space for {names} in {self.cfg.cache_dir.parent}: "
                f"{unpacked + kept} bytes needed ({unpacked} unpacked, {kept} for the "
                f"partial copies of the blobs), {free} available; enlarge the cache volume"
            )

    def _install(self, store: Store, found: list[tuple[Workload, Manifest]]) -> None:
        """Stream every workload into the staging tree and swap it in once. A precompile
        capture brings its precompiled entries only where precompile.decide() allows."""
        pulled = [m for _, m in found]
        decided = {
            m.workload: precompile.decide(m, w, [o for o in pulled if o is not m])
            for w, m in found
            if m.format == precompile.FORMAT
        }
        outcomes = {m.workload: _outcome(m, decided.get(m.workload)) for _, m in found}
        by_name = {w.name: w for w, _ in found}

        def part(w: Workload, m: Manifest) -> install.Part:
            entries = m.workload in decided and decided[m.workload].install

            def fill(folder: Path) -> None:
                self._fill(store, w, m, folder, entries)

            verified = m.publisher == NODE or bool(self.cfg.trusted_keys)  # signing.check
            about = {"manifest": f"{m.workload}/{m.fingerprint_digest}", "serial": m.serial,
                     "signer": m.signer if verified else None,
                     "publisher": m.publisher}  # fmt: skip
            return install.Part(m.workload, fill, about)

        def failed(p: install.Part, e: Exception) -> None:
            self.filled = time.perf_counter()
            self._failed(by_name[p.name], e)
            if self.require:
                raise _Stop from None  # fail-closed: stop at the first failure

        def commit(staging: Path, names: list[str]) -> None:
            # Memory first, tree second: a tree in the cache dir always has its serials
            # remembered; a swap refused after this only refuses manifests older than
            # one this node verified, as the swap would have.
            self._remember([m for _, m in found if m.workload in names])
            self.chan.send(Phase(f"installing {', '.join(names)}"))
            st = os.stat(staging)
            swapped = [outcomes[n] for n in names]
            if not self.chan.may_commit(swapped, (st.st_dev, st.st_ino)):
                raise InstallError("the gate refused the swap")  # not reached: it kills us

        def committed(names: list[str]) -> None:  # install_s: linking, syncing, swapping
            spent = time.perf_counter() - self.filled
            self.chan.send(Timing(f"install_s.{'+'.join(names)}", spent))
            for n in names:
                self.chan.send(Installed(outcomes[n]))
            self.chan.send(Phase(f"deleting the cache tree that {', '.join(names)} replaced"))

        parts = [part(w, m) for w, m in found]
        install.install(self.cfg.cache_dir, parts, keep=self._keep, before_swap=commit,
                        after_swap=committed, on_failure=failed)  # fmt: skip

    def _keep(self, name: str, about: Mapping[str, Any]) -> bool:
        """Whether another workload's share of the tree in place goes into the new tree:
        a node's publish only if a node key trusted now signed it; a seed's, with trusted
        keys, only if a key trusted now signed it (`signer` is recorded only where it was
        verified)."""
        if about.get("publisher") == NODE:
            return about.get("signer") in self.cfg.trusted_node_keys.keys
        trusted = self.cfg.trusted_keys
        return not trusted or about.get("signer") in trusted.keys

    def _trusted_all(self) -> TrustedKeys:
        """Every key this node verifies with, seed and node keys (their names are apart):
        the replay memory orders the serials of whatever they signed."""
        return TrustedKeys({**self.cfg.trusted_keys.keys, **self.cfg.trusted_node_keys.keys})

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
        publisher=m.publisher, serial=m.serial,
    )  # fmt: skip


def unpacked_bytes(m: Manifest) -> int:
    """Bytes the manifest's blobs take once installed, as the seed recorded them (0: unknown)."""
    n = m.warmup.get("unpacked_bytes")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0


def _warmup_summary(m: Manifest) -> dict[str, Any]:
    """What the seed's warm-up saw, kept in the marker to compare with what the app does."""
    keep = ("counters", "first_call_s", "so_files", "input_sets", "warmed_at")
    return {k: m.warmup[k] for k in keep if k in m.warmup}
