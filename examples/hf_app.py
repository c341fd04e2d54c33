"""An app of the kind a node runs: a `transformers` model compiled inside the app's own code.

It builds a tiny Llama (or BERT; or, `--model llama-logits`, the Llama behind a forward
that returns its logits tensor) from examples/tiny_hf.py (nothing downloaded), compiles it
the way `--compile` says, the two ways apps do it:
  module   model = torch.compile(model)
  forward  model.forward = torch.compile(model.forward)
  none     eager, for the reference digest
then makes its first call the way `--call` says: `forward` calls the model with keyword
inputs (input_ids [1, 16] from a fixed seed, attention_mask all ones) under no_grad,
`generate` runs greedy `model.generate(..., max_new_tokens=4)`. It prints its torch cache
counters, the first call's seconds, the seconds from torch.compile() until warm (the
first call returned) and, for generate, until its first new token, as one
`torchwarm_report` JSON line (README "Command workloads"), and with `--digest` one more
line, {"digest": ...}: the sum of the logits (forward) or the generated ids (generate),
for a test to compare with `--compile none`.

Measured on torch 2.13 / transformers 5.24 (CPU): `module` and `forward` make the same
FX-graph and AOTAutograd keys, so a cache warmed one way hits the other. `generate` makes
three graphs (the prompt, one new token, then one new token with the cache length
dynamic), none of which is the plain forward's: warm the call the app makes. And
`--compile module --call generate` compiles nothing (it says so on stderr): generate()
calls the original module's forward, not the compiled wrapper.

A seed runs it to fill the cache and a node runs the same command; the cache dir comes
from TORCHINDUCTOR_CACHE_DIR, as for any app.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
from tiny_hf import VOCAB, tiny_bert, tiny_llama, tiny_llama_logits
from torch._dynamo.utils import counters

try:
    from torchwarm.env.compat import COUNTERS
except ImportError:  # an app without torchwarm installed: the groups the report needs
    COUNTERS = {
        "inductor": ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass"),
        "aot_autograd": ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass"),
    }

SEQ = 16
INPUT_SEED = 1234
COMPILE_START = 0.0  # when torch.compile() was called (build)
FIRST_TOKEN = 0.0  # when generate() produced its first new token (FirstToken)


class FirstToken:
    """A generate() streamer that notes when the first new token arrives: its first
    put() is the prompt, its second the first generated token."""

    def __init__(self) -> None:
        self.puts = 0

    def put(self, value: torch.Tensor) -> None:
        global FIRST_TOKEN
        self.puts += 1
        if self.puts == 2:
            FIRST_TOKEN = time.perf_counter()

    def end(self) -> None:
        pass


def inputs() -> dict[str, torch.Tensor]:
    """The keyword inputs of every call: the same ids in every process."""
    gen = torch.Generator().manual_seed(INPUT_SEED)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=gen, dtype=torch.int64)
    return {"input_ids": ids, "attention_mask": torch.ones(1, SEQ, dtype=torch.int64)}


def build(model_name: str, how: str) -> torch.nn.Module:
    makers = {"llama": tiny_llama, "bert": tiny_bert, "llama-logits": tiny_llama_logits}
    model = makers[model_name]()
    global COMPILE_START
    COMPILE_START = time.perf_counter()  # in precompile mode torch.compile() loads entries
    if how == "module":
        return torch.compile(model)
    if how == "forward":
        model.forward = torch.compile(model.forward)
    return model


def first_call(model: Any, call: str) -> Any:
    """The app's first call; returns the digest of its output."""
    kwargs = inputs()
    with torch.no_grad():
        if call == "generate":
            out = model.generate(
                kwargs["input_ids"],
                attention_mask=kwargs["attention_mask"],
                max_new_tokens=4,
                do_sample=False,
                streamer=FirstToken(),
            )
            return out[0].tolist()
        out = model(**kwargs)
        if isinstance(out, torch.Tensor):  # llama-logits: the logits pick the first token
            global FIRST_TOKEN
            FIRST_TOKEN = time.perf_counter()
            return float(out.double().sum())
        # A causal LM returns logits; BERT's pooled output, since its last hidden state
        # leaves a LayerNorm (weight 1, bias 0 at init) and sums to 0 whatever its values.
        found = out.logits if hasattr(out, "logits") else out.pooler_output
        return float(found.double().sum())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("llama", "bert", "llama-logits"), default="llama")
    p.add_argument("--compile", choices=("module", "forward", "none"), default="forward")
    p.add_argument("--call", choices=("forward", "generate"), default="forward")
    p.add_argument("--digest", action="store_true", help="print the output's digest too")
    a = p.parse_args()
    if a.call == "generate" and a.model != "llama":
        p.error(
            "--call generate needs --model llama (BERT is an encoder, llama-logits "
            "returns a tensor)"
        )
    if a.compile == "module" and a.call == "generate":
        # OptimizedModule hands .generate to the original module, whose forward is eager.
        print("hf_app: torch.compile(model).generate(...) compiles nothing", file=sys.stderr)
    model = build(a.model, a.compile)
    start = time.perf_counter()
    digest = first_call(model, a.call)
    first_call_s = time.perf_counter() - start
    flat = {n: int(counters[group][n]) for group, names in COUNTERS.items() for n in names}
    until_warm_s = time.perf_counter() - COMPILE_START
    report: dict[str, Any] = {
        "counters": flat,
        "first_call_s": round(first_call_s, 3),
        "until_warm_s": round(until_warm_s, 3),
    }
    if FIRST_TOKEN:
        report["first_token_s"] = round(FIRST_TOKEN - COMPILE_START, 3)
    print(json.dumps({"torchwarm_report": report}), flush=True)
    if a.digest:
        print(json.dumps({"digest": digest}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
