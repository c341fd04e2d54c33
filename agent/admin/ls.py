"""What the store holds, for `torchwarm ls`: one entry per manifest."""

from __future__ import annotations

import calendar
import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from torchwarm.errors import IntegrityError
from torchwarm.spec import keys
from torchwarm.spec import manifest as mf
from torchwarm.stores import Store


@dataclass(frozen=True)
class Entry:
    workload: str
    fingerprint: str
    format: str
    size: int
    created_at: str
    age_s: float
    input_sets: str  # "4x64(dyn 0) 1x64", "1x16+mask=1x16+max_new_tokens=4"; "" for a command
    counters: dict[str, int] | None  # None: a command workload that reported none
    signed_by: str | None
    command: list[str] | None = None  # a command workload's argv
    serial: int = 0  # the publisher's write counter: what gc and nodes order by
    publisher: str = "seed"  # who published it: a seed's warm-up, or a node (its app's cache)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def entries(store: Store) -> list[Entry]:
    out = []
    for info in store.list(keys.MANIFESTS):
        if keys.parse_manifest_key(info.key) is None:
            continue
        try:
            m = mf.parse(store.read(info.key, mf.MAX_MANIFEST_BYTES).data, info.key)
        except IntegrityError:  # malformed or oversized: not listed
            continue
        out.append(
            Entry(
                m.workload,
                m.fingerprint_digest,
                m.format,
                m.size,
                m.created_at,
                _age(m.created_at, info.modified),
                _input_sets(m.warmup),
                _counters(m.warmup),
                m.signer,
                _command(m.warmup),
                m.serial,
                m.publisher,
            )  # fmt: skip
        )
    # Oldest first by serial, as gc ranks them (retention.py); created_at comes from the
    # publisher's clock, to the second, and only breaks ties.
    return sorted(out, key=lambda e: (e.workload, e.serial, e.created_at))


def _age(created_at: str, modified: float) -> float:
    try:
        created = calendar.timegm(datetime.strptime(created_at, "%Y-%m-%dT%H:%M:%SZ").timetuple())
    except ValueError:
        created = modified
    return time.time() - created


def _input_sets(warmup: dict[str, Any]) -> str:
    sets = []
    for s in warmup.get("input_sets", []) or []:
        try:
            parts = []
            for t in s:
                named = f"{t['name']}=" if "name" in t else ""  # a keyword input
                if "shape" not in t and "value" in t:  # a keyword constant
                    parts.append(f"{named}{json.dumps(t['value'])}")
                    continue
                shape = "x".join(str(d) for d in t["shape"])
                dyn = f"(dyn {','.join(map(str, t['dynamic']))})" if t.get("dynamic") else ""
                parts.append(named + shape + dyn)
            sets.append("+".join(parts))
        except (TypeError, KeyError):
            sets.append("?")
    return " ".join(sets)


def _counters(warmup: dict[str, Any]) -> dict[str, int] | None:
    c = warmup.get("counters")
    if isinstance(c, dict):
        return dict(c)
    # None (unknown, not zero): a command that printed none, or a node's publish of its app.
    return None if "command" in warmup or warmup.get("captured_from") == "app" else {}


def _command(warmup: dict[str, Any]) -> list[str] | None:
    argv = warmup.get("command")
    return [str(a) for a in argv] if isinstance(argv, list) else None
