"""Small modules that call and answer the way real libraries do (keyword inputs, outputs
that nest tensors beside other values, a method that calls forward), for the warm-up
child's in-process tests in test_real_models.py. They compile with backend `eager`
(Dynamo only): seconds, no kernels.

Where a test must tell the compiled call from eager, the module adds `torch.compiler.
is_compiling()` somewhere: 1 inside a compiled frame, 0 in eager.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

BUILT: list[torch.nn.Module] = []  # every module the factories made, last one last


@dataclasses.dataclass
class Extra:
    scaled: torch.Tensor
    note: str  # not a tensor: skipped by the comparison


class Opaque:
    """An object that holds a tensor but is no container (like a KV cache object)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class Nested(torch.nn.Module):
    """forward(x, *, mask, factor) -> a dict of a tensor, a tuple holding a list, a
    dataclass, and an opaque object; compiled, the dataclass's tensor is 1 higher."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor, factor: float) -> dict[str, Any]:
        y = self.a(x) * mask * factor
        z = self.b(x)
        shift = float(torch.compiler.is_compiling())
        return {"y": y, "pair": (z.sum(-1), [z.mean()]), "extra": Extra(y + shift, "text"),
                "cache": Opaque(y)}  # fmt: skip


class Steps(torch.nn.Module):
    """step(x) calls the module twice (as generate() calls forward); forward adds 1 when
    compiled, so a compiled step is 2 higher than an eager one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + float(torch.compiler.is_compiling())

    def step(self, x: torch.Tensor) -> torch.Tensor:
        return self(x) + self(x)


class MoreWhenCompiled(torch.nn.Module):
    """Returns one tensor in eager and two when compiled."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if torch.compiler.is_compiling():
            return x + 1, x + 2
        return (x + 1,)


def nested() -> Nested:
    BUILT.append(Nested())
    return BUILT[-1]


def steps() -> Steps:
    BUILT.append(Steps())
    return BUILT[-1]


def more_when_compiled() -> MoreWhenCompiled:
    return MoreWhenCompiled()
