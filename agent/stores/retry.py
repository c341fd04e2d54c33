"""Retries as a wrapper around any Store: the one retry policy for every backend.

Backends make exactly one attempt per request (their SDK retries are switched
off) and raise TransientStoreError for what is worth retrying: throttling
(S3 SlowDown / 503, GCS 429), other 5xx, connection resets, timeouts.
RetryingStore retries those with exponential backoff and full jitter, bounded
by a number of attempts AND an overall deadline per call; it never retries
access denied, not found, or a bad request.

Downloads never duplicate bytes in the sink: the wrapper counts what reached
the sink and, when the store declares it can resume (its capabilities'
`resumable_download`, true of every backend here), asks it to continue from that
offset; a store that cannot resume is retried only before its first byte.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar, cast

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from torchwarm.errors import StoreError, TransientStoreError, one_line
from torchwarm.stores.base import ObjectInfo, Read, Store

log = logging.getLogger(__name__)

T = TypeVar("T")


class _CountingSink:
    """Forwards writes to the caller's sink and counts the bytes that reached it."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink = sink
        self.written = 0

    def write(self, data: bytes) -> int:
        self.sink.write(data)
        self.written += len(data)
        return len(data)


class RetryingStore:
    """Wrap `inner`; retry TransientStoreError up to `attempts` times within `deadline_s`."""

    def __init__(
        self,
        inner: Store,
        attempts: int = 8,
        deadline_s: float = 60.0,
        backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
    ) -> None:
        if attempts < 1 or deadline_s <= 0:
            raise ValueError("attempts must be >= 1 and deadline_s > 0")
        self.inner = inner
        self.url = inner.url
        self.capabilities = inner.capabilities
        self.attempts = attempts
        self.deadline_s = deadline_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        start = time.monotonic()

        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.debug(
                "retrying %s in %.2f s after attempt %d/%d failed: %s",
                what,
                wait,
                state.attempt_number,
                self.attempts,
                exc,
            )

        retrying = Retrying(
            retry=retry_if_exception_type(TransientStoreError),
            # Full jitter: sleep uniformly in [0, min(max, base * 2**n)].
            wait=wait_random_exponential(multiplier=self.backoff_s, max=self.max_backoff_s),
            # stop_before_delay: never start a sleep that would end past the deadline.
            stop=stop_after_attempt(self.attempts) | stop_before_delay(self.deadline_s),
            before_sleep=log_retry,
            reraise=True,
        )
        attempt = 0
        try:
            for attempt_ctx in retrying:
                with attempt_ctx:
                    attempt = attempt_ctx.retry_state.attempt_number
                    return fn()
        except TransientStoreError as e:
            elapsed = time.monotonic() - start
            raise StoreError(
                f"{one_line(str(e))}; gave up after {attempt} attempt{'s' if attempt != 1 else ''} "
                f"in {elapsed:.1f} s: try again later, or raise the retry attempts/deadline"
            ) from e
        raise AssertionError("unreachable")  # pragma: no cover

    def read(self, key: str, limit: int) -> Read:
        return self._call(f"read({key})", lambda: self.inner.read(key, limit))

    def download(
        self, key: str, sink: BinaryIO, *, limit: int | None = None, offset: int = 0
    ) -> int:
        counting = _CountingSink(sink)
        out = cast(BinaryIO, counting)
        resumable = self.inner.capabilities.resumable_download

        def attempt() -> int:
            if resumable:
                # `limit` counts from byte 0: the backend never asks past it in all.
                self.inner.download(key, out, limit=limit, offset=offset + counting.written)
                return counting.written
            if counting.written:
                raise StoreError(
                    f"{self.url}/{key}: download failed after {counting.written} bytes "
                    "and this store cannot resume; try again"
                )
            return self.inner.download(key, out, limit=limit, offset=offset)

        return self._call(f"download({key})", attempt)

    def put(self, key: str, data: bytes | Path) -> None:
        self._call(f"put({key})", lambda: self.inner.put(key, data))

    def put_if_version(self, key: str, data: bytes, version: str | None) -> bool:
        # If an attempt's write reached the store but its answer was lost, the retry sees
        # our own object (as present, or as a change) and returns False: the caller reads
        # again and finds its data there.
        return self._call(
            f"put_if_version({key})", lambda: self.inner.put_if_version(key, data, version)
        )

    def exists(self, key: str) -> bool:
        return self._call(f"exists({key})", lambda: self.inner.exists(key))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # A listing retried half-way would repeat entries, so each attempt collects
        # the whole listing before the caller sees any of it.
        return iter(self._call(f"list({prefix})", lambda: list(self.inner.list(prefix))))

    def touch(self, key: str) -> None:
        self._call(f"touch({key})", lambda: self.inner.touch(key))

    def delete(self, key: str) -> None:
        self._call(f"delete({key})", lambda: self.inner.delete(key))
