"""Compile and run one workload in this process, and report what torch's caches did.

Used by the warm-up child (to fill a fresh cache dir) and by `torchwarm probe` (to
show that a node starts warm). The cache dir is whatever TORCHINDUCTOR_CACHE_DIR
says: callers set it before calling run().
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torchwarm.config import Constant, TensorSpec, Workload
from torchwarm.env import compat
from torchwarm.env.compat import COUNTERS
from torchwarm.errors import ConfigError, WarmupError


@dataclass
class InputSetReport:
    shapes: list[list[int]]
    dynamic: list[list[int]]
    first_call_s: float
    max_abs_diff: float  # compiled vs eager on the same inputs, over every output tensor
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword inputs (kwargs_doc)


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


def make_call(
    specs: tuple[TensorSpec, ...],
    by_name: Mapping[str, TensorSpec | Constant],
    device: str,
    seed: int,
) -> tuple[list[Any], dict[str, Any]]:
    """One call's inputs: positional tensors, then keyword tensors, from one generator
    (the positional ones are what they were before keyword inputs existed); keyword
    constants as written. Each tensor's `dynamic` dims are marked."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    args = [_tensor(s, gen, device) for s in specs]
    kwargs = {k: _tensor(v, gen, device) if isinstance(v, TensorSpec) else v
              for k, v in by_name.items()}  # fmt: skip
    return args, kwargs


def _tensor(s: TensorSpec, gen: Any, device: str) -> Any:
    import torch

    dtype = getattr(torch, s.dtype)
    if s.fill is not None:
        t = torch.full(s.shape, s.fill, dtype=dtype)
    elif dtype.is_floating_point:
        t = torch.randn(s.shape, generator=gen).to(dtype)
    elif dtype == torch.bool:
        t = torch.randint(0, 2, s.shape, generator=gen).bool()
    else:
        t = torch.randint(0, s.high, s.shape, generator=gen, dtype=dtype)
    t = t.to(device)
    for d in s.dynamic:
        compat.mark_dynamic(t, d)
    return t


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


def compile_call(workload: Workload, model: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The workload's call (its `method`) compiled the way the app compiles
    (`compile.target`), and the same call in eager, for the reference."""
    import torch

    options = workload.compile.as_kwargs()
    eager = getattr(model, workload.method, None)
    if not callable(eager):
        raise ConfigError(
            f"workload {workload.name!r}: model {workload.model!r} has no method "
            f"{workload.method!r}; fix method"
        )
    if workload.compile.target == "module":  # config: method is __call__ then
        return torch.compile(model, **options), eager
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"workload {workload.name!r}: compile.target is forward, but model "
            f"{workload.model!r} is a {type(model).__name__}, not a module; use target module"
        )
    compiled_forward = torch.compile(model.forward, **options)
    own = vars(model).get("forward", _NONE)  # a forward the factory set on the instance

    def compiled(*args: Any, **kwargs: Any) -> Any:
        # The app's model.forward = torch.compile(model.forward), for this call only: the
        # reference then runs the module's own forward, uncompiled.
        model.forward = compiled_forward
        try:
            return eager(*args, **kwargs)
        finally:
            if own is _NONE:
                del model.forward
            else:
                model.forward = own

    return compiled, eager


_NONE = object()


def output_tensors(out: Any) -> list[Any]:
    """The tensors of a call's output in order, at any depth of mappings (a transformers
    ModelOutput is one), dataclasses, tuples and lists. Other values (a KV cache object,
    a string) are skipped, containers met twice are walked once."""
    import torch

    found: list[Any] = []
    seen: set[int] = set()
    todo = [out]
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            found.append(x)
            continue
        if id(x) in seen:
            continue
        if isinstance(x, Mapping):
            items = list(x.values())
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            items = [getattr(x, f.name) for f in dataclasses.fields(x)]
        elif isinstance(x, (tuple, list)):
            items = list(x)
        else:
            continue
        seen.add(id(x))
        todo.extend(reversed(items))  # depth first, in the container's order
    return found


def max_abs_diff(out: list[Any], ref: list[Any], where: str) -> float:
    """The largest difference between the compiled call's tensors and eager's, pairwise."""
    if len(out) != len(ref) or not out:
        raise WarmupError(
            f"{where}: the compiled call returned {len(out)} tensor(s), eager {len(ref)}; "
            "torchwarm compares them pairwise, so the output must hold the same tensors "
            "(and at least one) both ways"
        )
    diff = 0.0
    for n, (a, b) in enumerate(zip(out, ref, strict=True)):
        if a.shape != b.shape:
            raise WarmupError(
                f"{where}: output tensor {n} has shape {list(a.shape)} compiled and "
                f"{list(b.shape)} in eager"
            )
        if a.numel():
            diff = max(diff, (a.float() - b.float()).abs().max().item())
    return diff


def _call(fn: Any, args: list[Any], kwargs: dict[str, Any], train: bool, where: str) -> list[Any]:
    """Call `fn` once; the tensors of its output, detached. Train mode: after the backward
    of the sum of its floating-point tensors."""
    import torch

    if not train:
        with torch.no_grad():
            return output_tensors(fn(*args, **kwargs))
    tensors = output_tensors(fn(*args, **kwargs))
    loss = None
    for t in tensors:
        if t.is_floating_point():
            loss = t.float().sum() if loss is None else loss + t.float().sum()
    if loss is None or not loss.requires_grad:
        raise WarmupError(
            f"{where}: mode is train, but the output holds no floating-point tensor that "
            "requires grad to run the backward of; use mode inference"
        )
    loss.backward()
    return [t.detach() for t in tensors]


def kwargs_doc(by_name: Mapping[str, TensorSpec | Constant]) -> dict[str, Any]:
    """Keyword inputs as reports say them: a tensor's shape, dtype and dynamic dims, a
    constant's value."""
    return {
        k: {"shape": list(v.shape), "dtype": v.dtype, "dynamic": list(v.dynamic)}
        if isinstance(v, TensorSpec)
        else {"value": v}
        for k, v in by_name.items()
    }


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
    compiled, eager = compile_call(workload, model)
    compile_s = time.perf_counter() - start
    train = workload.mode == "train"
    sync = torch.cuda.synchronize if workload.device.startswith("cuda") else (lambda: None)
    reports = []
    for i, specs in enumerate(workload.inputs):
        where = f"workload {workload.name!r}, input set {i}"
        by_name = workload.call_kwargs(i)
        args, kwargs = make_call(specs, by_name, workload.device, workload.seed + i)
        start = time.perf_counter()
        out = _call(compiled, args, kwargs, train, where)
        sync()
        elapsed = time.perf_counter() - start
        ref = _call(eager, args, kwargs, train, where)
        reports.append(
            InputSetReport(
                [list(s.shape) for s in specs],
                [list(s.dynamic) for s in specs],
                elapsed,
                max_abs_diff(out, ref, where),
                kwargs_doc(by_name),
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
