"""Find the manifest for this node's own workload and fingerprint, or say why there is none."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchwarm.env import fingerprint
from torchwarm.errors import ManifestError, ObjectNotFound
from torchwarm.spec import keys
from torchwarm.spec import manifest as mf
from torchwarm.spec.manifest import Manifest
from torchwarm.spec.signing import TrustedKeys, verify
from torchwarm.stores import Store


@dataclass(frozen=True)
class Miss:
    reason: str


def resolve(
    store: Store, workload: str, fields: dict[str, Any], trusted: TrustedKeys | None = None
) -> Manifest | Miss:
    """The manifest for (workload, fields), verified to be for exactly these fields and,
    when `trusted` holds keys, signed by one of them.

    A store error propagates (StoreError): "unreachable" is not "not found".
    """
    digest = fingerprint.digest(fields)
    key = keys.manifest_key(workload, digest)
    try:
        data = store.read(key, mf.MAX_MANIFEST_BYTES)
    except ObjectNotFound:
        return Miss(explain_miss(store, workload, fields))
    m = mf.parse(data, f"{store.url}/{key}")
    if trusted:
        verify(m, trusted, f"{store.url}/{key}")
    if m.workload != workload or m.fingerprint != fields:
        # Keys are not trusted: a manifest copied to another key must not be taken.
        differ = fingerprint.differences(fields, m.fingerprint)
        raise ManifestError(
            f"manifest {store.url}/{key} was built for another environment or workload "
            f"(differs in: {', '.join(differ) or 'workload'}); refusing it"
        )
    return m


def explain_miss(store: Store, workload: str, fields: dict[str, Any]) -> str:
    """One line on why nothing matched: nothing for the workload, or which fields differ."""
    digest = fingerprint.digest(fields)
    here = f"no cache for workload {workload!r} and fingerprint {digest} in {store.url}"
    others = []
    for info in store.list(keys.workload_prefix(workload)):
        parsed = keys.parse_manifest_key(info.key)
        if parsed is None or parsed[1] == digest:
            continue
        try:
            others.append(mf.parse(store.read(info.key, mf.MAX_MANIFEST_BYTES), info.key))
        except Exception:  # noqa: BLE001 - an explanation must not turn a miss into a failure
            continue
    if not others:
        return f"{here} (the store holds no cache for this workload; run a warm-up)"
    nearest = min(others, key=lambda m: len(fingerprint.differences(fields, m.fingerprint)))
    differ = fingerprint.differences(fields, nearest.fingerprint)
    return (
        f"{here}; the store has {len(others)} for other environments, the nearest differing "
        f"in: {', '.join(differ)}"
    )
