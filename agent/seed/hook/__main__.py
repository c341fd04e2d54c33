"""`python -m torchwarm.seed.hook -- ARGV`: exec ARGV with the hook first on PYTHONPATH."""

from __future__ import annotations

import os
import sys

from torchwarm.seed.hook import HOOK_DIR


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m torchwarm.seed.hook -- PROGRAM [ARG...]", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HOOK_DIR), *filter(None, [env.get("PYTHONPATH")])])
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        print(f"torchwarm: cannot start {argv[0]!r}: {e.strerror}; fix the workload's command "
              "(no shell: a program on PATH, or a path) or cwd", file=sys.stderr)  # fmt: skip
        return 127
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
