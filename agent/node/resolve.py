"""Find the manifest for this node's own workload and fingerprint, or say why there is none."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from torchwarm.env import fingerprint
from torchwarm.errors import ManifestError, ObjectNotFound, printable
from torchwarm.spec import keys
from torchwarm.spec import manifest as mf
from torchwarm.spec.manifest import Manifest
from torchwarm.spec.signing import TrustedKeys, check
from torchwarm.stores import Store

# A miss's explanation reads other environments' manifests inside the pull's deadline,
# and the store decides how many there are: it reads the newest of them only, at most
# this many, this many bytes in all, for this long.
EXPLAIN_MAX_MANIFESTS = 16
EXPLAIN_MAX_BYTES = 4 << 20
EXPLAIN_MAX_S = 2.0


@dataclass(frozen=True)
class Miss:
    reason: str


def resolve(
    store: Store,
    workload: str,
    fields: dict[str, Any],
    trusted: TrustedKeys | None = None,
    trusted_node: TrustedKeys | None = None,
) -> Manifest | Miss:
    """The manifest for (workload, fields), verified to be for exactly these fields and
    signed as its publisher must sign (signing.check): a seed's by one of `trusted` when
    it holds keys, a node's by one of `trusted_node`, which it must hold.

    A store error propagates (StoreError): "unreachable" is not "not found".
    """
    digest = fingerprint.digest(fields)
    key = keys.manifest_key(workload, digest)
    try:
        data = store.read(key, mf.MAX_MANIFEST_BYTES).data
    except ObjectNotFound:
        return Miss(explain_miss(store, workload, fields))
    m = mf.parse(data, f"{store.url}/{key}")
    check(m, trusted or TrustedKeys({}), trusted_node or TrustedKeys({}), f"{store.url}/{key}")
    if m.workload != workload or m.fingerprint != fields:
        # Keys are not trusted: a manifest copied to another key must not be taken.
        differ = fingerprint.differences(fields, m.fingerprint)
        raise ManifestError(
            f"manifest {store.url}/{key} was built for another environment or workload "
            f"(differs in: {printable(', '.join(differ)) or 'workload'}); refusing it"
        )
    return m


def explain_miss(store: Store, workload: str, fields: dict[str, Any]) -> str:
    """One line on why nothing matched: nothing for the workload, or which fields differ
    from the nearest of the other environments compared (the newest, within the bounds
    above; the line says how many were not compared)."""
    digest = fingerprint.digest(fields)
    here = f"no cache for workload {workload!r} and fingerprint {digest} in {store.url}"
    t0 = time.monotonic()
    listed, cut = [], False
    for info in store.list(keys.workload_prefix(workload)):
        parsed = keys.parse_manifest_key(info.key)
        if parsed is not None and parsed[1] != digest:
            listed.append(info)
        if time.monotonic() - t0 > EXPLAIN_MAX_S:
            cut = True
            break
    listed.sort(key=lambda i: i.modified, reverse=True)
    others, reads, spent = [], 0, 0
    for info in listed:
        if reads == EXPLAIN_MAX_MANIFESTS or time.monotonic() - t0 > EXPLAIN_MAX_S:
            break
        # A store reads up to limit + 1 bytes to refuse more: within the budget still.
        limit = min(mf.MAX_MANIFEST_BYTES, EXPLAIN_MAX_BYTES - spent - 1)
        if info.size > limit:
            continue  # over what is left of the budget, or over a manifest's cap
        reads += 1
        spent += limit + 1  # what the read may take, until it says how much it took
        try:
            data = store.read(info.key, limit).data
            spent += len(data) - (limit + 1)
            others.append(mf.parse(data, info.key))
        except Exception:  # noqa: BLE001 - an explanation must not turn a miss into a failure
            continue
    unread = len(listed) - reads
    has = f"the store has {'at least ' if cut else ''}{len(listed)} for other environments"
    if not listed:
        return f"{here} (the store holds no cache for this workload; run a warm-up)"
    if others:
        nearest = min(others, key=lambda m: len(fingerprint.differences(fields, m.fingerprint)))
        differ = fingerprint.differences(fields, nearest.fingerprint)
        line = f"{here}; {has}, the nearest differing in: {printable(', '.join(differ))}"
    else:
        line = f"{here}; {has}, none of them readable"
    if unread:
        line += (
            f"; {unread} other environments not compared (a miss reads at most "
            f"{EXPLAIN_MAX_MANIFESTS} manifests, {EXPLAIN_MAX_BYTES >> 20} MiB, for "
            f"{EXPLAIN_MAX_S:g} s, newest first)"
        )
    return line
