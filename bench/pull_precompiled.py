"""Stand-in for `torchwarm pull` of a `precompile` capture, until node.py calls
torchwarm.precompile.decide() (#11): resolve, fetch and verify as the pull does, decide,
and install the capture with or without its Dynamo entries. Prints one JSON line:
{"precompiled": bool, "reason": "..."}. Run it with the app's PYTHONPATH and working
directory, like the pull.

Usage: python bench/pull_precompiled.py -c CONFIG --workload W --cache-dir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--cache-dir", required=True, type=Path)
    a = ap.parse_args()
    # This script's folder is sys.path[0]; the app would not see it.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
    from torchwarm import config, fetch, fingerprint, formats, install, precompile, torchenv
    from torchwarm.resolve import Miss, resolve

    cfg = config.load(a.config, {"cache_dir": str(a.cache_dir.resolve())})
    w = cfg.workload(a.workload)
    fields = fingerprint.collect(scratch=torchenv.probe_scratch())
    store = cfg.open_store()
    m = resolve(store, w.name, fields, cfg.trusted_keys)
    if isinstance(m, Miss):
        sys.exit(f"no capture for this node: {m.reason}")
    with install.locked(cfg.cache_dir) as work:
        downloads = work / f"downloads-{os.getpid()}"
        downloads.mkdir(parents=True, exist_ok=True)
        try:
            blobs = fetch.fetch(store, m, downloads)
            d = precompile.decide(m, w)
            install.install(
                cfg.cache_dir,
                lambda staging: formats.get(m.format).install(
                    blobs, staging, precompiled=d.install
                ),
            )
        finally:
            shutil.rmtree(downloads, ignore_errors=True)
    print(json.dumps({"precompiled": d.install, "reason": d.reason}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
