"""The Python API, for platforms without init containers (Ray actors, notebooks, a plain
`python app.py` on a VM): pull from the app's own process, then point torch at the cache.

    import torchwarm

    report = torchwarm.pull("/etc/torchwarm/config.yaml")  # what `torchwarm pull` does
    torchwarm.activate(report)  # before `import torch`
    import torch

`pull` runs exactly the CLI's pull (a forked worker under the hard deadline, the same
fail-open / fail-closed rule, the same ready marker) and returns the report that
`pull --json` prints. Fail-open (the default) never raises; with `require=True` the error
that stopped the pull is raised (a `torchwarm.errors.TorchwarmError` subclass whose
`exit_code` is the CLI's), having installed nothing.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torchwarm.node.report import PullReport


def pull(
    config: str | os.PathLike[str] | None,
    *,
    workload: str | None = None,
    require: bool | None = None,
    deadline_s: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    marker: str | os.PathLike[str] | None = None,
    store: str | None = None,
) -> PullReport:
    """Install the verified cache for this machine, then write the ready marker.

    `config`: the YAML file (None: defaults and TORCHWARM_* environment only). The
    keyword arguments override it as the CLI's flags do; None keeps the config's value.
    """
    from torchwarm.node import gate as node

    overrides = {
        "store": store,
        "cache_dir": _abs(cache_dir),
        "marker": _abs(marker),
        "deadline_s": deadline_s,
    }
    path = None if config is None else os.fspath(config)
    report, _ = node.gate(path, overrides, workload, require)
    return report


def app_env(report: PullReport, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The app's environment after `report`'s pull (a copy of `base` or os.environ): its
    torch caches in the cache dir, Triton's with them, the config's `env` (other compile
    caches under the cache dir, as the seed's warm-ups had them), and
    TORCH_CACHING_PRECOMPILE=1 where precompiled entries were installed. `torchwarm run`
    starts the app with it, less that variable after a failed start with the entries in
    this boot (`activate` too: torchwarm.node.precompile_trial)."""
    from torchwarm.env import torchenv
    from torchwarm.node import precompile_rules as precompile

    env = dict(os.environ if base is None else base)
    if report.cache_dir:
        env = torchenv.cache_env(Path(report.cache_dir), env, extra=report.env)
    env.update(precompile.app_env(w.__dict__ for w in report.workloads))
    return env


def activate(report: PullReport) -> dict[str, str]:
    """Apply `app_env(report)` to this process's environment (TRITON_CACHE_DIR unset);
    return the variables it set.

    Call it before importing torch: torch reads TORCH_CACHING_PRECOMPILE when it is
    imported (the cache dir it reads at each use). With precompiled entries, this start
    is recorded beside the ready marker, and how the process ends (an uncaught exception
    fails it; so does a death without exiting, seen by the next start): if a start with
    them failed in this boot, precompile stays off, with a warning that says why
    (torchwarm.node.precompile_trial).
    """
    from torchwarm.node import precompile_rules as precompile
    from torchwarm.node import precompile_trial

    wanted = app_env(report)
    trial, off = precompile_trial.begin(report)
    if off:
        wanted.pop(precompile.ENV_VAR, None)
        warnings.warn(off, stacklevel=2)
    elif trial is not None:
        precompile_trial.watch(trial)
    changed = {k: v for k, v in wanted.items() if os.environ.get(k) != v}
    for k in set(os.environ) - set(wanted):
        os.environ.pop(k)
    os.environ.update(changed)
    if "torch" in sys.modules and "TORCH_CACHING_PRECOMPILE" in changed:
        warnings.warn(
            "torchwarm.activate() after `import torch`: torch has read "
            "TORCH_CACHING_PRECOMPILE already, so the precompiled entries are not used; "
            "call it before importing torch",
            stacklevel=2,
        )
    return changed


def _abs(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else os.path.abspath(os.fspath(path))
