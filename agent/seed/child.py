"""Compile and run one workload in this process, and report what torch's caches did.

Used by the warm-up child (to fill a fresh cache dir) and by `torchwarm probe` (to
show that a node starts warm). The cache dir is whatever TORCHINDUCTOR_CACHE_DIR
says: callers set it before calling run().
"""

from __future__ import annotations

import importlib
import inspect
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torchwarm.config import TensorSpec, Workload
from torchwarm.env import compat
from torchwarm.env.compat import COUNTERS
from torchwarm.errors import ConfigError, WarmupError


@dataclass
class InputSetReport:
    shapes: list[list[int]]
    dynamic: list[list[int]]
    first_call_s: float
    max_abs_diff: float  # compiled vs eager on the same inputs


@dataclass
class RunReport:
    workload: str
    cache_dir: str
    first_call_s: float  # torch.compile() + every input set's first call: time until warm
    input_sets: list[InputSetReport]
    counters: dict[str, int]
    new_so_files: int  # CPU kernels compiled (not loaded from the cache) during this run
    compile_s: float = 0.0  # the torch.compile() call alone (precompile: loads entries)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_dir() -> Path:
    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not value:
        raise WarmupError(
            "TORCHINDUCTOR_CACHE_DIR is not set; the caller must choose the cache dir"
        )
    return Path(value)


def count_so(root: Path) -> int:
    return sum(1 for _ in root.rglob("*.so")) if root.exists() else 0


def load_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"model {spec!r}: cannot import {module_name!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model {spec!r}: {attr!r} is not callable")
    return obj


def make_inputs(specs: tuple[TensorSpec, ...], device: str, seed: int) -> list[Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for s in specs:
        dtype = getattr(torch, s.dtype)
        if dtype.is_floating_point:
            t = torch.randn(s.shape, generator=gen).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, s.shape, generator=gen).bool()
        else:
            t = torch.randint(0, s.high, s.shape, generator=gen, dtype=dtype)
        tensors.append(t.to(device))
    return tensors


def build(workload: Workload) -> Any:
    """The model (or function) the workload names, on its device, in its mode."""
    import torch

    factory = load_factory(workload.model)
    if not workload.model_kwargs and _takes_inputs(factory):
        return factory  # a plain function named directly: what gets compiled
    torch.manual_seed(workload.seed)
    made = factory(**workload.model_kwargs)
    if isinstance(made, torch.nn.Module):
        made = made.to(workload.device)
        made.train(workload.mode == "train")
        return made
    if callable(made):
        return made
    raise ConfigError(f"model {workload.model!r} returned {type(made).__name__}, not a module")


def _takes_inputs(fn: Any) -> bool:
    """Whether `fn` needs positional arguments (the inputs), unlike a factory."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in params
    )


def _call(fn: Any, inputs: list[Any], train: bool) -> Any:
    import torch

    if train:
        out = fn(*inputs)
        out.float().sum().backward()
        return out.detach()
    with torch.no_grad():
        return fn(*inputs)


def run(workload: Workload) -> RunReport:
    """Compile the workload and call it once per input set; return timings and counters."""
    import torch

    counters = compat.counters()
    root = cache_dir()
    so_before = count_so(root)
    # Each workload compiles as in a process of its own (as its warm-up did): no compiled
    # code or automatic-dynamic state of an earlier workload, and counters of this run only.
    torch.compiler.reset()
    before = _counters(counters)
    model = build(workload)
    if workload.compile.backend == "inductor":
        compat.import_inductor()  # imported by torch.compile() below: an import is not timed
    start = time.perf_counter()
    # Lazy for the FX-graph path (milliseconds); in precompile mode torch loads the
    # Dynamo entries and their kernels here, before any call.
    compiled = torch.compile(model, **workload.compile.as_kwargs())
    compile_s = time.perf_counter() - start
    train = workload.mode == "train"
    sync = torch.cuda.synchronize if workload.device.startswith("cuda") else (lambda: None)
    reports = []
    for i, specs in enumerate(workload.inputs):
        inputs = make_inputs(specs, workload.device, workload.seed + i)
        for t, s in zip(inputs, specs, strict=True):
            for d in s.dynamic:
                compat.mark_dynamic(t, d)
        start = time.perf_counter()
        out = _call(compiled, inputs, train)
        sync()
        elapsed = time.perf_counter() - start
        ref = _call(model, inputs, train)
        diff = (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0
        reports.append(
            InputSetReport(
                [list(s.shape) for s in specs], [list(s.dynamic) for s in specs], elapsed, diff
            )
        )
    flat = {k: v - before[k] for k, v in _counters(counters).items()}
    return RunReport(
        workload=workload.name,
        cache_dir=str(root),
        first_call_s=compile_s + sum(r.first_call_s for r in reports),
        input_sets=reports,
        counters=flat,
        new_so_files=count_so(root) - so_before,
        compile_s=compile_s,
    )


def _counters(counters: Any) -> dict[str, int]:
    return {name: int(counters[group][name]) for group, names in COUNTERS.items() for name in names}
