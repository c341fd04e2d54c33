"""A miss's explanation is bounded: it compares only the newest other environments, in
count, bytes and time, names the differing fields, and escapes what the store wrote."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from factories import StoreWrapper, fields, manifest

from torchwarm.node import resolve
from torchwarm.node.resolve import Miss
from torchwarm.spec import keys
from torchwarm.stores import Read
from torchwarm.stores.local import LocalStore

OTHERS = 40  # other environments in the store: more than the explanation compares


class Reads(StoreWrapper):
    """Records the keys read and the bytes returned; sleeps `delay_s` per manifest read."""

    def __init__(self, inner: Any, delay_s: float = 0.0) -> None:
        super().__init__(inner)
        self.keys: list[str] = []
        self.bytes = 0
        self.delay_s = delay_s

    def read(self, key: str, limit: int) -> Read:
        self.keys.append(key)
        time.sleep(self.delay_s)
        got = self.inner.read(key, limit)
        self.bytes += len(got.data)
        return got


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def put_other(store: LocalStore, i: int, data: bytes | None = None, **changes: Any) -> str:
    """Manifest number `i` of another environment (threads differ), `i` seconds old."""
    fp = fields(threads=100 + i, **changes)
    m = manifest(fingerprint=fp)
    key = keys.manifest_key("mlp", m.fingerprint_digest)
    store.put(key, m.to_json() if data is None else data)
    age = time.time() - 1000 + i  # a higher i is newer
    os.utime(store.root / key, (age, age))
    return key


def explain(store: Any) -> str:
    got = resolve.resolve(store, "mlp", fields())
    assert isinstance(got, Miss)
    return got.reason


def test_a_miss_compares_only_the_newest_other_environments(store):
    """Of many other environments, only the newest EXPLAIN_MAX_MANIFESTS are read; the
    line still names the differing field and says how many were not compared."""
    written = [put_other(store, i) for i in range(OTHERS)]
    reads = Reads(store)
    reason = explain(reads)
    others = [k for k in reads.keys if k in written]
    assert sorted(others) == sorted(written[-resolve.EXPLAIN_MAX_MANIFESTS :])
    assert "nearest differing in: threads" in reason, reason
    assert f"{OTHERS - resolve.EXPLAIN_MAX_MANIFESTS} other environments not compared" in reason


@pytest.mark.timed
def test_a_slow_store_stops_the_explanation_after_its_time_bound(store):
    """A store that takes 0.3 s per manifest read: the explanation stops after
    EXPLAIN_MAX_S instead of reading all of them inside the pull's deadline."""
    for i in range(OTHERS):
        put_other(store, i)
    slow = Reads(store, delay_s=0.3)
    t0 = time.monotonic()
    reason = explain(slow)
    assert time.monotonic() - t0 < resolve.EXPLAIN_MAX_S + 1.0
    assert "other environments not compared" in reason, reason


def test_junk_manifests_cost_at_most_the_byte_budget(store):
    """Junk of 1 MiB under many other fingerprints: the explanation reads at most
    EXPLAIN_MAX_BYTES in all, not 1 MiB per manifest."""
    junk = b"[" + b"0," * ((1 << 19) - 2) + b"0]"  # 1 MiB of valid JSON, not a manifest
    for i in range(20):
        put_other(store, i, data=junk)
    reads = Reads(store)
    reason = explain(reads)
    assert reads.bytes <= resolve.EXPLAIN_MAX_BYTES, reads.bytes
    assert "other environments not compared" in reason, reason


def test_store_supplied_field_names_are_escaped(store):
    """A fingerprint field named with a terminal escape is printed escaped, never raw."""
    put_other(store, 0, **{"\x1b]0;OWNED\x07": "x"})
    reason = explain(store)
    assert "\x1b" not in reason and "\x07" not in reason
    assert "\\x1b]0;OWNED\\x07" in reason, reason
