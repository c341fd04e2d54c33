"""The app's view of `torchwarm run --publish` (#19): how much later the app starts, and
how much later `run` ends after the app, against plain `torchwarm run`.

Each round starts a fresh node (an empty cache dir, an empty local-folder store, so the
pull is cold and a publish is planned) and runs a tiny app that records when its first
line ran (time.time(), before any import), then optionally writes one compile entry
into its cache dir and exits 0. Side by side in one run, interleaved (this machine is
noisy; absolute times mean little):
    run            torchwarm run -- app                (exec: the app is torchwarm's PID)
    run --publish  torchwarm run --publish -- app      (a thin parent; the app writes
                   nothing, so nothing is published: the start cost alone)
    + publish      the same, the app writes one entry: run publishes it after the app
                   exited 0 (capture, upload, manifest), the cost of its end
Reported, medians: "app starts" = the app's first line - the moment `torchwarm` was
started; "ends" = torchwarm's exit - the app's exit. The goal (#19): the app starts at
most 50 ms later with --publish.
Usage: python bench/selfseed.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

from torchwarm.spec import signing

CLI = (sys.executable, "-m", "torchwarm.cli")
APP = textwrap.dedent(
    """
    import time; started = time.time()
    import os, sys
    if sys.argv[2] == "entry":
        d = os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "fxgraph", "ab", "k" * 20)
        os.makedirs(d)
        with open(os.path.join(d, "entry"), "wb") as f:
            f.write(os.urandom(4096))
    with open(sys.argv[1], "w") as f:
        f.write(f"{started} {time.time()}")
    """
)
VARIANTS = (("run", (), "none"), ("run --publish", ("--publish",), "none"),
            ("+ publish", ("--publish",), "entry"))  # fmt: skip


def once(root: Path, flags: tuple[str, ...], writes: str) -> tuple[float, float]:
    """(app start - torchwarm start, torchwarm exit - app exit), in seconds."""
    shutil.rmtree(root / "node", ignore_errors=True)
    shutil.rmtree(root / "store", ignore_errors=True)
    stamp = root / "stamp"
    t0 = time.time()
    proc = subprocess.run(
        [*CLI, "run", "-c", str(root / "torchwarm.yaml"), *flags, "--", sys.executable,
         str(root / "app.py"), str(stamp), writes],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    t1 = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"run exited {proc.returncode}: {proc.stderr}")
    if writes == "entry" and "publish: published" not in proc.stderr:
        raise SystemExit(f"the publish did not happen: {proc.stderr}")
    started, ended = (float(x) for x in stamp.read_text().split())
    return started - t0, t1 - ended


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="torchwarm-bench-selfseed-"))
    try:
        secret, _ = signing.generate("node-1")
        (root / "node-1.secret").write_text(secret + "\n")
        (root / "app.py").write_text(APP)
        doc = {"store": str(root / "store"), "cache_dir": str(root / "node" / "inductor"),
               "node_key_file": str(root / "node-1.secret"),
               "workloads": [{"name": "app", "command": [sys.executable, "app.py"]}]}  # fmt: skip
        (root / "torchwarm.yaml").write_text(yaml.safe_dump(doc))
        once(root, (), "none")  # page in the interpreter and torchwarm first
        starts: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
        ends: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
        for _ in range(a.rounds):
            for name, flags, writes in VARIANTS:
                start, end = once(root, flags, writes)
                starts[name].append(start)
                ends[name].append(end)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(starts["run"])
    print(f"torchwarm run --publish, {a.rounds} interleaved rounds, medians "
          "(a fresh node each: cold pull, empty local-folder store)")  # fmt: skip
    print(f"{'':16} {'app starts':>11} {'later':>9} {'run ends after app':>19}")
    for name, _, _ in VARIANTS:
        s, e = statistics.median(starts[name]), statistics.median(ends[name])
        print(f"{name:16} {s * 1000:8.1f} ms {(s - base) * 1000:+6.1f} ms {e * 1000:16.1f} ms")
    later = (statistics.median(starts["run --publish"]) - base) * 1000
    print(
        f"goal: the app starts at most 50 ms later with --publish: "
        f"{'met' if later <= 50 else 'NOT met'} ({later:+.1f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
