"""A command workload for the tests, without torch: an app with a compile cache of its own.

Default: keep one entry in $APP_CACHE_ROOT (a second cache root, like vLLM's), written
when absent, and print what it found and saw as one JSON line. Modes:
  --spy FILE    write its environment and argv to FILE, then do the default
  --fail        print a last line and exit 3
  --hang FILE   start a grandchild, write both pids to FILE, sleep until killed
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

SEEN = ("APP_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "WARM_ONLY")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--fail"]:
        print("compiling...")
        print("boom: the warm-up request failed", flush=True)
        return 3
    if argv[:1] == ["--hang"]:
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(argv[1] + ".tmp", "w") as f:
            json.dump({"child": os.getpid(), "grandchild": grandchild.pid}, f)
        os.rename(argv[1] + ".tmp", argv[1])
        print("waiting for a request that never comes", flush=True)
        time.sleep(600)
    if argv[:1] == ["--spy"]:
        with open(argv[1], "w") as f:
            json.dump({"env": dict(os.environ), "argv": sys.argv, "cwd": os.getcwd()}, f)
    root = os.environ["APP_CACHE_ROOT"]
    entry = os.path.join(root, "entry.json")
    found = None
    if os.path.exists(entry):
        with open(entry) as f:
            found = json.load(f)
    else:
        os.makedirs(root, exist_ok=True)
        with open(entry, "w") as f:
            json.dump({"written_in": root}, f)
    print(json.dumps({"found": found, "env": {k: os.environ.get(k) for k in SEEN}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
