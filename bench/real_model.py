"""A real library's causal LM on a fresh node: cold, node, local-warm, precompile node.

The app is examples/hf_app.py, each run in a new process, over a tiny transformers Llama
(examples/tiny_hf.py, built from a config in code, random weights), two ways:
  generate  `model.forward = torch.compile(model.forward)`, then a greedy
            `model.generate(..., max_new_tokens=4)`: configs/hf-llama.yaml's
            `llama-generate` workload
  logits    the Llama behind a forward returning its logits (tiny_hf.LogitsOnly),
            `torch.compile(model)`, one call: configs/hf-llama-precompile.yaml's
            `llama-logits`, whose precompiled entries load (the Llama's own forward's
            do not: the seed's canary drops them, README "What the canary checks")
Each workload is captured once as `cachedir` and once as `precompile`, each pushed to a
local-folder store of its own. Per round, side by side
(this machine is noisy; rounds interleave so that noise hits every row alike):
    cold              empty cache dir
    node              a fresh node: `torchwarm pull` of the cachedir capture, then the app
    local-warm        that node's cache dir again, warmed by its own first run
    precompile node   a fresh node pulling the precompile capture, the app with
                      TORCH_CACHING_PRECOMPILE=1 where the pull installed the entries
Two figures per row, both from torch.compile() on (torch and transformers imports, the
model's construction and the pull are not in them): "warm" until the call returned,
"first token" until generate()'s first new token (logits: the call's end, whose logits
pick it). Ratios are against local-warm.
Usage: python bench/real_model.py [--repeat 3] [--cases generate,logits]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from nodes import ROOT, counters_line, pull, torchwarm

# case: (config, workload, the app's arguments)
CASES = {
    "generate": ("hf-llama.yaml", "llama-generate",
                 ("--compile", "forward", "--call", "generate")),
    "logits": ("hf-llama-precompile.yaml", "llama-logits",
               ("--model", "llama-logits", "--compile", "module", "--call", "forward")),
}  # fmt: skip
ROWS = ("cold", "node", "local-warm", "precompile node")


def app(args: tuple[str, ...], cache_dir: Path, extra: dict[str, str]) -> dict[str, Any]:
    """The app's report line, run in a new process with its torch caches in `cache_dir`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_CACHE_DIR"}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT / "examples"),
               HF_HUB_OFFLINE="1", **extra)  # fmt: skip
    argv = [sys.executable, str(ROOT / "examples" / "hf_app.py"), *args]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith('{"torchwarm_report"'):
            report: dict[str, Any] = json.loads(line)["torchwarm_report"]
            return report
    sys.exit(f"the app printed no report line: {out[-400:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="rounds (medians reported)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: generate, logits")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="torchwarm-bench-") as tmp:
        for case in a.cases.split(","):
            bench(case, *CASES[case], Path(tmp) / case, a.repeat)
    return 0


def bench(case: str, config_name: str, workload: str, args: tuple[str, ...], work: Path,
          repeat: int) -> None:  # fmt: skip
    config = str(ROOT / "configs" / config_name)
    seed_env = {"PYTHONPATH": str(ROOT / "examples"), "HF_HUB_OFFLINE": "1"}
    warm: dict[str, list[float]] = {r: [] for r in ROWS}
    token: dict[str, list[float]] = {r: [] for r in ROWS}
    seen: dict[str, str] = {}
    envs = {}
    for fmt in ("cachedir", "precompile"):
        envs[fmt] = {**seed_env, "TORCHWARM_STORE": (work / f"store-{fmt}").as_uri(),
                     "TORCHWARM_FORMAT": fmt}  # fmt: skip
        print(f"[{case} {fmt}] seed: warm-up of {workload} and push …", flush=True)
        torchwarm("warmup", "-c", config, "--workload", workload, "--push", env=envs[fmt])
    for i in range(repeat):
        got: dict[str, dict[str, Any]] = {}
        got["cold"] = app(args, work / f"cold-{i}", {})
        node = work / f"node-{i}" / "inductor"
        p = pull(config, workload, node, env=envs["cachedir"])
        got["node"] = app(args, node, p["app_env"])
        got["local-warm"] = app(args, node, {})
        pre = work / f"pre-{i}" / "inductor"
        p = pull(config, workload, pre, env=envs["precompile"])
        if not p["precompiled"]:
            print(f"[{case} precompile] entries left out: {p['reason']}", flush=True)
        got["precompile node"] = app(args, pre, p["app_env"])
        for row, r in got.items():
            warm[row].append(r["until_warm_s"])
            token[row].append(r["first_token_s"])
            seen[row] = counters_line(r["counters"])
        said = ", ".join(f"{row} {r['until_warm_s']:.2f} s" for row, r in got.items())
        print(f"[{case}] round {i + 1}/{repeat}: {said}", flush=True)
    base_warm = statistics.median(warm["local-warm"])
    base_token = statistics.median(token["local-warm"])
    print(f"\n{workload} ({case}: hf_app.py {' '.join(args)}), median of {repeat}:")
    print("| row | warm | first token | warm ÷ local-warm | first token ÷ local-warm | hits |")
    print("|---|---|---|---|---|---|")
    for row in ROWS:
        w, t = statistics.median(warm[row]), statistics.median(token[row])
        print(f"| {row} | {w:.2f} s | {t:.2f} s | {w / base_warm:.2f} | "
              f"{t / base_token:.2f} | {seen[row]} |")  # fmt: skip
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
