"""An app for the precompile tests of command workloads (and, copied into a temp dir, a
model module): a small module compiled with torch.compile and called once, its output
compared with eager.

`--model plain` compiles `Plain`. `--model decorated` compiles `Decorated`, whose forward
is wrapped by a decorator that reads the wrapped function's `__name__`, as transformers'
models are: torch 2.13 saves its precompiled entry with that function replaced by a
placeholder, and a fresh process fails to load it, inside torch.compile(), with
`AttributeError: '_Missing' object has no attribute '__name__'`.

It prints one `torchwarm_report` line with torch's cache counters (Dynamo's too) and the
distance to eager, and exits 1 when that is more than TOLERANCE.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._dynamo.utils import counters

GROUPS = {
    "inductor": ("fxgraph_cache_hit", "fxgraph_cache_miss"),
    "aot_autograd": ("autograd_cache_hit", "autograd_cache_miss"),
    "dynamo_cache": ("dynamo_cache_hit", "dynamo_cache_miss", "dynamo_cache_error"),
}
TOLERANCE = 1e-4


def named(func: Callable[..., Any]) -> Callable[..., Any]:
    """A decorator that checks the name of what it wraps when called."""

    @functools.wraps(func)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if func.__name__ != "forward":
            raise TypeError(f"{func.__name__} is not a forward")
        return func(self, *args, **kwargs)

    return wrapper


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(nn.functional.gelu(self.a(x)))


class Decorated(Plain):
    @named
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("plain", "decorated"), default="plain")
    a = p.parse_args()
    torch.manual_seed(0)
    model = Plain() if a.model == "plain" else Decorated()
    compiled = torch.compile(model)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (compiled(x) - model(x)).abs().max().item()
    flat = {n: int(counters[g][n]) for g, names in GROUPS.items() for n in names}
    print(json.dumps({"torchwarm_report": {"counters": flat}, "max_abs_diff": diff}), flush=True)
    return 0 if diff <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
