"""One exception tree; the CLI maps each class to one documented exit code (see cli.py).

Messages are one line: what was wrong, where, what to do.
"""

from __future__ import annotations


class TorchwarmError(Exception):
    """Base of every error torchwarm raises on purpose."""

    exit_code = 1


class InternalError(TorchwarmError):
    """A bug: an exception torchwarm did not raise on purpose, caught where it must not
    stop the app (the pull's worker, its gate) and reported as one line."""


class ConfigError(TorchwarmError):
    """The YAML file, an environment variable or a flag is invalid."""

    exit_code = 2


class UnsupportedTorch(ConfigError):
    """The installed torch is not a version torchwarm was tested with (env/compat.py)."""


class StoreError(TorchwarmError):
    """The store could not be reached or answered something unusable."""

    exit_code = 3


class TransientStoreError(StoreError):
    """The store failed in a way that may pass: throttled, 5xx, reset, timed out.

    Backends raise it; stores/retry.py retries it; the CLI maps it like any StoreError.
    """


class ObjectNotFound(StoreError):
    """A key the caller asked for does not exist in the store."""


class ReadOnlyStoreError(StoreError):
    """A write was asked of a store opened read-only (stores/readonly.py; nodes open their
    store so): refused before it reached the store, and never retried."""


def one_line(text: str) -> str:
    """Collapse whitespace (SDK messages hold newlines) so an error stays one line."""
    return " ".join(text.split())


def printable(text: str) -> str:
    """`text` with every character a terminal or log viewer could act on (controls,
    escapes, bidi overrides, line breaks) written as its backslash escape: for lines that
    quote what torchwarm did not write (the store, its server, manifests, the config, the
    environment), which may hold anything. Applied where lines are printed or logged
    (docs/security.md, "What torchwarm prints"); escaping twice changes nothing."""
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


class IntegrityError(TorchwarmError):
    """Downloaded bytes or a manifest failed verification; nothing was installed."""

    exit_code = 4


class ObjectTooLarge(IntegrityError):
    """An object in the store holds more bytes than its reader allows (a manifest over the
    manifest cap, a blob over its manifest's size); the read stopped at limit + 1 bytes.

    `version` is the object's version token where the store gave one (see Store.read),
    so that a publisher can replace it conditionally.
    """

    def __init__(self, where: str, limit: int, version: str | None = None) -> None:
        super().__init__(
            f"{where} holds more than the {limit} bytes allowed for it; refusing it "
            "(delete that key, then push again from the seed)"
        )
        self.where, self.limit, self.version = where, limit, version


class RefusedNodePublish(IntegrityError):
    """A node's publish that this node does not take (it trusts no node key, or not the
    one that signed it, or the signature fails): a node that publishes may replace it
    (node/selfseed.py), as it may not a seed's. `serial`: that manifest's."""

    def __init__(self, message: str, serial: int) -> None:
        super().__init__(message)
        self.serial = serial


class ManifestError(IntegrityError):
    """A manifest is malformed, of an unknown version, or for another fingerprint."""


class ArchiveError(IntegrityError):
    """An archive is malformed or holds a member that may not be installed."""


class NoCacheForFingerprint(TorchwarmError):
    """The store holds no manifest for this workload and fingerprint (fail-closed only)."""

    exit_code = 5


class InstallError(TorchwarmError):
    """The cache could not be installed into the cache directory."""

    exit_code = 6


class WarmupError(TorchwarmError):
    """The warm-up subprocess failed to compile or capture a workload."""

    exit_code = 7


class WorkloadsFailed(WarmupError):
    """`daemon --once`: one or more workloads failed, for any reason (each has its event)."""


class DeadlineExceeded(TorchwarmError):
    """The pull did not finish within its deadline (fail-closed only; fail-open starts cold)."""

    exit_code = 9


class Cancelled(TorchwarmError):
    """Work was stopped on request (the daemon is shutting down); nothing was published."""

    exit_code = 130


class WaitTimeout(TorchwarmError):
    """`torchwarm wait` gave up before the ready marker appeared."""

    exit_code = 8
