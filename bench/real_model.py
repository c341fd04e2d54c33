"""A real library's causal LM on a fresh node: cold, node, local-warm, precompile node.

The app is examples/hf_app.py: a tiny transformers Llama (examples/tiny_hf.py, built from
a config in code, random weights), `model.forward = torch.compile(model.forward)`, then a
greedy `model.generate(..., max_new_tokens=4)`, each run in a new process. The seed is
configs/hf-llama.yaml's `llama-generate` workload, captured once as `cachedir` and once
as `precompile`, each pushed to a local-folder store of its own. Per round, side by side
(this machine is noisy; rounds interleave so that noise hits every row alike):
    cold              empty cache dir
    node              a fresh node: `torchwarm pull` of the cachedir capture, then the app
    local-warm        that node's cache dir again, warmed by its own first run
    precompile node   a fresh node pulling the precompile capture, the app with
                      TORCH_CACHING_PRECOMPILE=1 where the pull installed the entries
Two figures per row, both from torch.compile() on (torch and transformers imports, the
model's construction and the pull are not in them): "warm" until generate() returned,
"first token" until its first new token. Ratios are against local-warm.
Usage: python bench/real_model.py [--repeat 3]
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

CONFIG = str(ROOT / "configs" / "hf-llama.yaml")
WORKLOAD = "llama-generate"
APP = [sys.executable, str(ROOT / "examples" / "hf_app.py"), "--compile", "forward",
       "--call", "generate"]  # fmt: skip
ROWS = ("cold", "node", "local-warm", "precompile node")


def app(cache_dir: Path, extra: dict[str, str]) -> dict[str, Any]:
    """The app's report line, run in a new process with its torch caches in `cache_dir`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_CACHE_DIR"}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT / "examples"),
               HF_HUB_OFFLINE="1", **extra)  # fmt: skip
    out = subprocess.run(APP, env=env, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith('{"torchwarm_report"'):
            report: dict[str, Any] = json.loads(line)["torchwarm_report"]
            return report
    sys.exit(f"the app printed no report line: {out[-400:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="rounds (medians reported)")
    a = ap.parse_args()
    seed_env = {"PYTHONPATH": str(ROOT / "examples"), "HF_HUB_OFFLINE": "1"}
    warm: dict[str, list[float]] = {r: [] for r in ROWS}
    token: dict[str, list[float]] = {r: [] for r in ROWS}
    seen: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="torchwarm-bench-") as tmp:
        work = Path(tmp)
        envs = {}
        for fmt in ("cachedir", "precompile"):
            envs[fmt] = {**seed_env, "TORCHWARM_STORE": (work / f"store-{fmt}").as_uri(),
                         "TORCHWARM_FORMAT": fmt}  # fmt: skip
            print(f"[{fmt}] seed: warm-up of {WORKLOAD} and push …", flush=True)
            torchwarm("warmup", "-c", CONFIG, "--workload", WORKLOAD, "--push", env=envs[fmt])
        for i in range(a.repeat):
            got: dict[str, dict[str, Any]] = {}
            got["cold"] = app(work / f"cold-{i}", {})
            node = work / f"node-{i}" / "inductor"
            p = pull(CONFIG, WORKLOAD, node, env=envs["cachedir"])
            got["node"] = app(node, p["app_env"])
            got["local-warm"] = app(node, {})
            pre = work / f"pre-{i}" / "inductor"
            p = pull(CONFIG, WORKLOAD, pre, env=envs["precompile"])
            if not p["precompiled"]:
                print(f"[precompile] entries left out: {p['reason']}", flush=True)
            got["precompile node"] = app(pre, p["app_env"])
            for row, r in got.items():
                warm[row].append(r["until_warm_s"])
                token[row].append(r["first_token_s"])
                seen[row] = counters_line(r["counters"])
            said = ", ".join(f"{row} {r['until_warm_s']:.2f} s" for row, r in got.items())
            print(f"round {i + 1}/{a.repeat}: {said}", flush=True)
    base_warm = statistics.median(warm["local-warm"])
    base_token = statistics.median(token["local-warm"])
    print(f"\n{WORKLOAD} (tiny Llama, generate 4 tokens), median of {a.repeat}:")
    print("| row | warm | first token | warm ÷ local-warm | first token ÷ local-warm | hits |")
    print("|---|---|---|---|---|---|")
    for row in ROWS:
        w, t = statistics.median(warm[row]), statistics.median(token[row])
        print(f"| {row} | {w:.2f} s | {t:.2f} s | {w / base_warm:.2f} | "
              f"{t / base_token:.2f} | {seen[row]} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
