"""Progress of long transfers: a live line on a terminal, one plain log line otherwise."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

_MIN_BYTES = 8 << 20  # smaller transfers finish before a bar would help


class Progress:
    """Context manager: `update(n)` as bytes move; prints to stderr (never stdout)."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() and total >= _MIN_BYTES
        self.t0 = time.monotonic()
        self._last = 0.0

    def __enter__(self) -> Progress:
        return self

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.live and now - self._last >= 0.2:
            self._last = now
            pct = 100 * self.done / self.total if self.total else 100
            self.stream.write(f"\r{self.label}: {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB "
                              f"({pct:.0f}%)")  # fmt: skip
            self.stream.flush()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is not None or self.total < _MIN_BYTES:
            if self.live:
                self.stream.write("\n")
            return
        secs = time.monotonic() - self.t0
        end = "\r" if self.live else ""
        self.stream.write(f"{end}{self.label}: {self.total / 1e6:.1f} MB in {secs:.1f} s "
                          f"({self.total / 1e6 / max(secs, 1e-9):.0f} MB/s)\n")  # fmt: skip
        self.stream.flush()
