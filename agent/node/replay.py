"""Replay protection: the newest manifest serial this node installed, per workload and
environment, kept in the install workdir (docs/security.md, "stolen old manifest").

A fresh workdir (a new emptyDir, a new VM) has no memory: it accepts any genuine manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torchwarm.errors import IntegrityError
from torchwarm.spec.manifest import Manifest
from torchwarm.util.fs import atomic_write_bytes

INSTALLED = "installed.json"


class Memory:
    """What this node installed before; loaded and saved under the install lock."""

    def __init__(self, work: Path) -> None:
        self.path = work / INSTALLED
        self.entries: dict[str, dict[str, Any]] = {}
        try:
            doc = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            doc = {}  # none yet, or damaged: protection restarts from here
        if isinstance(doc, dict):
            self.entries = doc

    @staticmethod
    def key(m: Manifest) -> str:
        return f"{m.workload}/{m.fingerprint_digest}"

    def check(self, m: Manifest, where: str) -> None:
        """Refuse a manifest older than one this node installed before (a replay)."""
        before = self.entries.get(self.key(m))
        serial = before.get("serial") if isinstance(before, dict) else None
        if isinstance(serial, int) and m.serial < serial:
            raise IntegrityError(
                f"manifest for {m.workload!r} in {where} is older (serial {m.serial}) than the "
                f"one this node installed before ({serial}); refusing a replayed manifest"
            )

    def record(self, manifests: list[Manifest]) -> None:
        for m in manifests:
            self.entries[self.key(m)] = {"serial": m.serial, "created_at": m.created_at}
        atomic_write_bytes(self.path, json.dumps(self.entries, sort_keys=True).encode())
