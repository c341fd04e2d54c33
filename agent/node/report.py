"""What a pull did, per workload: the marker's content, `pull --json`, and the lines people read."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torchwarm.errors import printable


@dataclass
class WorkloadOutcome:
    workload: str
    status: str  # "warm" or "cold"
    reason: str = ""  # why it starts cold: one line
    manifest: str = ""  # <workload>/<fingerprint digest>
    format: str = ""
    blobs: list[dict[str, Any]] = field(default_factory=list)
    bytes: int = 0
    warmup: dict[str, Any] = field(default_factory=dict)  # the seed's counters, to compare
    precompiled: bool = False  # precompiled Dynamo entries installed: run the app with
    # TORCH_CACHING_PRECOMPILE=1 (`torchwarm run` does)
    precompile_reason: str = ""  # why a precompile capture's entries were left out
    no_cache: bool = False  # cold because the store has no manifest for this fingerprint
    # Cold because a node's manifest for it was refused (errors.RefusedNodePublish): its
    # serial, which a node that publishes replaces; None otherwise.
    refused_node: int | None = None
    publisher: str = ""  # warm: who published the manifest installed ("seed" or "node")
    serial: int = 0  # warm: that manifest's serial


@dataclass
class PullReport:
    status: str  # "warm" (every workload), "partial", or "cold"
    cache_dir: str
    fingerprint: str
    store: str
    workloads: list[WorkloadOutcome]
    timings: dict[str, float]
    written_at: str = ""
    timed_out: bool = False  # the deadline passed before the pull finished
    reason: str = ""  # why nothing was tried (a config error), if so
    env: dict[str, str] = field(default_factory=dict)  # the config's `env` for the app,
    # {cache_dir} expanded (other compile caches inside the cache dir)
    marker: str = ""  # where the ready marker was written; "" if it could not be
    marker_error: str = ""  # why it could not be

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()


def overall(outcomes: list[WorkloadOutcome]) -> str:
    warm = sum(o.status == "warm" for o in outcomes)
    return "warm" if outcomes and warm == len(outcomes) else "cold" if warm == 0 else "partial"


def _warmed_elsewhere(o: WorkloadOutcome, cache_dir: str) -> str | None:
    """Where a path-exact warm-up (at_node_path) compiled, when not at `cache_dir`."""
    at = o.warmup.get("warmed_at")
    return at if isinstance(at, str) and at and at != cache_dir else None


def describe(report: PullReport) -> list[str]:
    """The pull's outcome for people: a line per workload, then one summary line, each
    escaped (errors.printable): reasons quote the store, its server and the config."""
    lines = []
    if report.reason:
        lines.append(f"starting cold: {report.reason}")
    for o in report.workloads:
        if o.status == "warm":
            lines.append(f"warm: {o.workload} ({o.format}, {o.bytes} bytes) installed in "
                         f"{report.cache_dir}")  # fmt: skip
            if (moved := _warmed_elsewhere(o, report.cache_dir)) is not None:
                lines.append(f"warmed at another path: {o.workload}: the seed compiled it "
                             f"with its cache at {moved}, this node's cache_dir is "
                             f"{report.cache_dir}; a cache that records its own root "
                             "(vLLM's) misses here: give seed and node the same "
                             "cache_dir")  # fmt: skip
            if o.precompiled:
                lines.append(f"precompiled: {o.workload}: run the app with "
                             "TORCH_CACHING_PRECOMPILE=1 (torchwarm run sets it)")  # fmt: skip
            elif o.precompile_reason:
                lines.append(f"precompiled entries left out: {o.workload}: {o.precompile_reason} "
                             "(still warm through the FX-graph cache)")  # fmt: skip
        else:
            lines.append(f"starting cold: {o.workload}: {o.reason}")
    where = (
        f"marker written to {report.marker}"
        if report.marker
        else f"no marker written{': ' + report.marker_error if report.marker_error else ''}"
    )
    lines.append(f"ready ({report.status}) in {report.timings.get('total_s', 0):.2f} s; {where}")
    return [printable(line) for line in lines]
