"""Transfer helpers shared by the cloud backends."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO


def write_ranges_in_order(
    fetch: Callable[[int, int], bytes],
    start: int,
    end: int,
    chunk: int,
    concurrency: int,
    sink: BinaryIO,
) -> int:
    """Fetch bytes [start, end) as ranges on a thread pool and write them to `sink` in order.

    At most `concurrency` ranges are in flight or waiting, so memory stays near
    concurrency * chunk; the caller hashes while later ranges still download.
    """
    ranges = iter([(o, min(o + chunk, end)) for o in range(start, end, chunk)])
    written = 0
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="torchwarm-range")
    pending: deque[Future[bytes]] = deque()
    try:
        for lo, hi in ranges:
            pending.append(pool.submit(fetch, lo, hi))
            if len(pending) >= concurrency:
                break
        while pending:
            data = pending.popleft().result()
            sink.write(data)
            written += len(data)
            nxt = next(ranges, None)
            if nxt is not None:
                pending.append(pool.submit(fetch, *nxt))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return written
