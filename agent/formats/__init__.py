"""Capture formats: how a warm cache becomes blobs, and how blobs become a cache again.

Every format implements the same steps (see base.py): prepare and save in the warm-up
child, capture after it, describe for the manifest, install on the node. `get(name)`
picks one.
"""

from __future__ import annotations

from torchwarm.errors import ConfigError
from torchwarm.formats.base import Captured, Format, cache_members
from torchwarm.formats.cachedir import CacheDirFormat
from torchwarm.formats.megacache import MegaCacheFormat
from torchwarm.formats.precompile import PrecompileFormat

__all__ = ["Captured", "Format", "cache_members", "get", "FORMATS"]

FORMATS: dict[str, Format] = {
    f.name: f for f in (CacheDirFormat(), MegaCacheFormat(), PrecompileFormat())
}


def get(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(
            f"unknown capture format {name!r}; expected one of: {', '.join(FORMATS)}"
        ) from None
