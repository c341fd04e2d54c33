"""Replay protection: the newest manifest serial this node installed, per workload and
environment and per signer, kept in the install workdir (docs/security.md, "stolen old
manifest").

A manifest is refused when its serial is lower than one remembered for a signer that
counts: with trusted keys, the keys trusted now (a correctly signed old manifest is
refused whichever trusted key signed the newer one); without keys, every one. What was
installed unsigned while keys were off, or signed by a key no longer trusted, does not
refuse what the trusted keys signed. A serial is the publisher's clock in µs: one more
than MAX_AHEAD_US ahead of this node's clock is refused and never remembered, and one
remembered so far ahead (by an older torchwarm) is ignored, so no single manifest can
shut a node out for longer than that.

A fresh workdir (a new emptyDir, a new VM) has no memory: it accepts any genuine
manifest. Deleting `installed.json` in the workdir (`torchwarm.node.install.workdir`)
is the operator's reset: that node then accepts any genuine manifest once, as a new
node does, an older one included.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from torchwarm.errors import IntegrityError
from torchwarm.spec.manifest import Manifest
from torchwarm.spec.signing import TrustedKeys
from torchwarm.util.fs import atomic_write_bytes, read_json

INSTALLED = "installed.json"
MAX_AHEAD_US = 24 * 3600 * 10**6  # a day: clock skew allowed between a seed and a node
UNSIGNED = ""  # installed while this node trusted no keys (a signature not verified)
ANY = "*"  # remembered by an older torchwarm, signer unknown: counts whatever the keys


def now_us() -> int:
    """This node's clock, in a serial's unit (µs since the epoch)."""
    return time.time_ns() // 1000


class Memory:
    """What this node installed before; loaded and saved under the install lock."""

    def __init__(self, work: Path, trusted: TrustedKeys | None = None) -> None:
        self.path = work / INSTALLED
        self.trusted = trusted or TrustedKeys({})
        self.entries: dict[str, dict[str, Any]] = {}
        doc = read_json(self.path)  # None: none yet, or damaged: protection restarts here
        if isinstance(doc, dict):
            self.entries = {k: v for k, v in doc.items() if isinstance(v, dict)}

    @staticmethod
    def key(m: Manifest) -> str:
        return f"{m.workload}/{m.fingerprint_digest}"

    def check(self, m: Manifest, where: str) -> None:
        """Refuse a manifest stamped too far ahead of this node's clock, or older than one
        this node installed before (a replay)."""
        now = now_us()
        if m.serial > now + MAX_AHEAD_US:
            raise IntegrityError(
                f"manifest for {m.workload!r} in {where} has serial {_shown(m.serial)}, more "
                f"than a day ahead of this node's clock ({now} µs); refusing it: the seed's "
                "clock (or this node's) is wrong, or the serial is forged; fix the clock, "
                "then delete that manifest and push again"
            )
        remembered = self._binding(self.key(m), now)
        if remembered is not None and m.serial < remembered:
            raise IntegrityError(
                f"manifest for {m.workload!r} in {where} is older (serial {m.serial}) than the "
                f"one this node installed before ({remembered}); refusing a replayed manifest "
                f"(if that serial is wrong, deleting {self.path} resets this node's memory)"
            )

    def record(self, manifests: list[Manifest]) -> None:
        now = now_us()
        for m in manifests:
            by = self._counted(self.key(m), now, every=True)
            label = (m.signer or UNSIGNED) if self.trusted else UNSIGNED
            by[label] = max(by.get(label, 0), m.serial)
            if self.trusted:  # keys no longer trusted are not remembered (bounded)
                by = {s: n for s, n in by.items() if s in (ANY, UNSIGNED) or s in self.trusted.keys}
            self.entries[self.key(m)] = {
                "serial": max(by.values()),
                "created_at": m.created_at,
                "by": by,
            }
        atomic_write_bytes(self.path, json.dumps(self.entries, sort_keys=True).encode())

    def _binding(self, key: str, now: int) -> int | None:
        """The serial a manifest for `key` must not be below, if any."""
        by = self._counted(key, now, every=not self.trusted)
        return max(by.values()) if by else None

    def _counted(self, key: str, now: int, every: bool) -> dict[str, int]:
        """Remembered serials for `key` by signer, those too far ahead left out; `every`:
        all signers', else those that bind under the keys trusted now."""
        entry = self.entries.get(key, {})
        by = entry.get("by")
        if not isinstance(by, dict):
            serial = entry.get("serial")
            by = {ANY: serial}  # an older torchwarm's entry: one serial, signer unknown
        return {
            s: n
            for s, n in by.items()
            if isinstance(s, str)
            and type(n) is int
            and 0 <= n <= now + MAX_AHEAD_US
            and (every or s == ANY or s in self.trusted.keys)
        }


def _shown(serial: int) -> str:
    """A serial short enough for one line."""
    text = str(serial)
    return text if len(text) <= 24 else f"{text[:12]}… ({len(text)} digits)"
