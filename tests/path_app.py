"""A command workload for the tests, without torch: an app whose cache entries hold the
absolute path of their cache root, and which refuses an entry recorded for another root,
as vLLM's standalone-compile handles (a key and an absolute path) do when the root moves.

Default: with its cache root $APP_CACHE_ROOT, read `entry.json` there; one recorded for
this root is a hit, one recorded for another root is refused (exit 4, one line naming both
roots), none is a miss and the entry is written. It prints one JSON line:
{"hit": bool, "root": ..., "listed": [names in TORCHINDUCTOR_CACHE_DIR when it started]}.
Modes (before the default):
  --record FILE   append that line, with start and end times and the pid, to FILE
  --sleep S       sleep S seconds after starting (holds the cache dir a while)
  --fail          write an entry (and the record), then exit 3
  --hang FILE     write the pid to FILE, then sleep until killed
"""

from __future__ import annotations

import json
import os
import sys
import time

ENTRY = "entry.json"
REFUSED = 4


def main(argv: list[str]) -> int:
    started = time.time()
    cache = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    listed = sorted(os.listdir(cache)) if os.path.isdir(cache) else None
    root = os.path.abspath(os.environ["APP_CACHE_ROOT"])
    opts = _options(argv)
    os.makedirs(root, exist_ok=True)
    entry = os.path.join(root, ENTRY)
    if "--hang" in opts:
        _write(entry, root)
        with open(opts["--hang"] + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(opts["--hang"] + ".tmp", opts["--hang"])
        print("hanging", flush=True)
        time.sleep(600)
    if "--sleep" in opts:
        time.sleep(float(opts["--sleep"]))
    if "--fail" in opts:
        _write(entry, root)
        _record(opts, {"hit": False, "root": root, "listed": listed}, started)
        print("boom: the app failed", flush=True)
        return 3
    hit = False
    if os.path.exists(entry):
        with open(entry) as f:
            recorded = json.load(f)["root"]
        if recorded != root:
            print(f"refused: entry recorded for {recorded}, this root is {root}", flush=True)
            return REFUSED
        hit = True
    else:
        _write(entry, root)
    line = {"hit": hit, "root": root, "listed": listed}
    print(json.dumps(line), flush=True)
    _record(opts, line, started)
    return 0


def _record(opts: dict[str, str], line: dict[str, object], started: float) -> None:
    if "--record" in opts:
        with open(opts["--record"], "a") as f:
            f.write(json.dumps({**line, "pid": os.getpid(), "start": started,
                                "end": time.time()}) + "\n")  # fmt: skip


def _options(argv: list[str]) -> dict[str, str]:
    """--fail alone; --record, --sleep and --hang each with a value."""
    opts, rest = {}, list(argv)
    while rest:
        name = rest.pop(0)
        opts[name] = "" if name == "--fail" else rest.pop(0)
    return opts


def _write(entry: str, root: str) -> None:
    with open(entry, "w") as f:
        json.dump({"root": root}, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
