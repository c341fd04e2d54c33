"""Backends chosen by URL scheme; see base.py for the interface every one implements."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import ConfigError
from .base import ObjectInfo, Store
from .local import LocalStore

__all__ = ["ObjectInfo", "Store", "open_store", "SCHEMES"]

SCHEMES = ("file",)


def open_store(url: str) -> Store:
    """Return the backend for `url` (`file:///abs/path`)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"store URL {url!r}: file URLs take no host; use file:///abs/path")
        path = Path(unquote(parsed.path))
        if not path.is_absolute():
            raise ConfigError(f"store URL {url!r}: the path must be absolute")
        return LocalStore(path)
    raise ConfigError(
        f"store URL {url!r}: unsupported scheme {parsed.scheme or '(none)'!r}; "
        f"supported: {', '.join(s + '://' for s in SCHEMES)}"
    )
