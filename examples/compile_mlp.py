"""A warm-up script of the kind a command workload runs (configs/example-command.yaml).

It stands for an app that compiles inside its own code: it builds a small MLP in code
(nothing downloaded), compiles it with torch.compile, calls it on a batch of 4 (batch
marked dynamic, so it covers larger ones) and a batch of 1 (which specializes), and
prints its own torch cache counters as one JSON line, the `torchwarm_report` line that
torchwarm reads from a command's output (README "Command workloads"). The seed runs it
to fill the cache; the app runs the same script (`torchwarm run -- python
examples/compile_mlp.py`) and its line shows the hits. torchwarm is not imported: the
cache dir comes from TORCHINDUCTOR_CACHE_DIR, as for any app.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torch._dynamo.utils import counters

# torch._dynamo.utils.counters group -> the names torchwarm keeps from the report line.
REPORTED = {
    "inductor": ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass"),
    "aot_autograd": ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=32, help="input and output features")
    p.add_argument("--hidden", type=int, default=64)
    a = p.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(a.width, a.hidden), nn.GELU(), nn.Linear(a.hidden, a.width))
    compiled = torch.compile(model)
    start = time.perf_counter()
    with torch.no_grad():
        batch4 = torch.randn(4, a.width)
        torch._dynamo.mark_dynamic(batch4, 0)
        for x in (batch4, torch.randn(1, a.width)):
            diff = (compiled(x) - model(x)).abs().max().item()
            assert diff < 1e-4, f"compiled output differs from eager by {diff}"
    first_call_s = time.perf_counter() - start
    flat = {n: int(counters[group][n]) for group, names in REPORTED.items() for n in names}
    report = {"counters": flat, "first_call_s": round(first_call_s, 3)}
    print(json.dumps({"torchwarm_report": report}), flush=True)


if __name__ == "__main__":
    main()
