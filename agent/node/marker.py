"""The ready marker: the pull's report as a JSON file, tied to one boot, and `wait` on it.

A marker names the boot it was written in (`boot_id`): `$TORCHWARM_BOOT_ID` when set
(the deploy kit sets the pod's UID through the downward API, so a pod recreated on a
persistent volume is a new boot), else the kernel's boot id. `wait` ignores a marker
from another boot, so a waiter that starts before the pull has deleted last boot's
marker does not pass at once. A blank $TORCHWARM_BOOT_ID, or one with whitespace around
it, is a config error (torchwarm.config), never a boot id that every boot would share.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from torchwarm.config import BOOT_ID_VAR, boot_id_variable
from torchwarm.errors import WaitTimeout
from torchwarm.util.fs import atomic_write_json, read_json

_KERNEL_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id(environ: dict[str, str] | None = None) -> str:
    """This boot's identity: $TORCHWARM_BOOT_ID, else the kernel's boot id."""
    given = boot_id_variable(environ)
    if given is not None:
        return given
    try:
        return "kernel:" + _KERNEL_BOOT_ID.read_text().strip()
    except OSError:
        return "unknown"


def write(path: Path, doc: dict[str, Any]) -> None:
    """Write the marker atomically, stamped with this boot's identity."""
    atomic_write_json(path, {**doc, "boot_id": boot_id()})


def clear(path: Path) -> None:
    """Remove a marker left by an earlier pull (a waiter must not pass on it)."""
    with contextlib.suppress(OSError):  # one we cannot remove is still refused by its boot id
        path.unlink(missing_ok=True)


def read(path: Path) -> dict[str, Any] | None:
    """The marker's content if it exists, parses and was written in this boot."""
    # None: not there yet (it is written atomically: a damaged one is foreign junk)
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("boot_id") != boot_id():
        return None
    return doc


def wait(path: Path, timeout_s: float, poll_s: float = 0.2) -> dict[str, Any]:
    """Block until this boot's marker exists; return its content."""
    boot_id()  # a blank $TORCHWARM_BOOT_ID is refused now, not after the timeout
    deadline = time.monotonic() + timeout_s
    while True:
        doc = read(path)
        if doc is not None:
            return doc
        if time.monotonic() >= deadline:
            raise WaitTimeout(
                f"no ready marker of this boot at {path} after {timeout_s:g} s; is the "
                f"torchwarm pull running with the same marker path and ${BOOT_ID_VAR}?"
            )
        time.sleep(poll_s)
