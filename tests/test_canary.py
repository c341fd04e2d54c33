"""The canary: a workload whose precompiled entries torch cannot load in a fresh process
is published without them, and the node's app starts and computes right.

The workload is real, no failure is injected: tests/pc_app.py's `Decorated`, whose
forward is wrapped by a decorator that reads the wrapped function's `__name__` (as
transformers' models are). torch 2.13 saves its entry, and a fresh process with
TORCH_CACHING_PRECOMPILE=1 dies in torch.compile() rebuilding its guards:
`AttributeError: '_Missing' object has no attribute '__name__'`. One seed for the module,
both kinds: a model workload (the module copied into a temp package dir) and a command
workload (the app script).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import torchwarm
from test_precompile_command import APP, TOLERANCE, app_report, app_workload, stored_manifest

from torchwarm.seed.warmup import WarmupResult
from torchwarm.spec import archive

pytestmark = [pytest.mark.compile, pytest.mark.usefixtures("trust_the_vector_isa")]

CRASH = "'_Missing' object has no attribute '__name__'"
MODEL = {"name": "model", "model": "pcapp:Decorated", "inputs": [[{"shape": [4, 16]}]]}


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Both workloads warmed up as precompile and pushed (two compiles, their second runs
    and canaries: ~70 s on 2 cores); the config and the environment its apps need."""
    root = tmp_path_factory.mktemp("canary")
    pkg = root / "app"
    pkg.mkdir()
    shutil.copy(APP, pkg / "pcapp.py")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(pkg), os.environ.get("PYTHONPATH")]))}
    doc = {
        "store": str(root / "store"),
        "cache_dir": str(root / "node" / "inductor"),
        "format": "precompile",
        "workloads": [MODEL, app_workload("cmd", "decorated")],
    }
    cfg = root / "torchwarm.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    torchwarm("warmup", "-c", str(cfg), "--out", str(root / "out"), env=env, timeout=600)
    torchwarm("push", "-c", str(cfg), "--from", str(root / "out"), env=env)
    return cfg, env


@pytest.mark.parametrize("workload", ["model", "cmd"])
def test_entries_torch_cannot_load_are_not_published(seed, workload):
    """The manifest says the entries were dropped and why (torch's error in the canary's
    fresh process), names no key, and its dynamo blob holds nothing."""
    cfg, _ = seed
    meta = stored_manifest(cfg, workload).warmup["precompile"]
    assert meta["entries"] == "dropped" and meta["dynamo_keys"] == []
    assert CRASH in meta["entries_reason"] and "\n" not in meta["entries_reason"]
    result = WarmupResult.load(cfg.parent / "out" / workload)
    (dynamo,) = [c.path for c in result.captured if c.role == "dynamo"]
    assert archive.members(dynamo) == []


def test_the_node_installs_no_entries_and_says_why(seed):
    """`pull`: warm through the FX-graph part, no Dynamo entry in the cache dir, and one
    line per workload with the seed's reason."""
    cfg, env = seed
    out = torchwarm("pull", "-c", str(cfg), "--require", env=env)
    left_out = [x for x in out.stdout.splitlines() if x.startswith("precompiled entries left out")]
    assert len(left_out) == 2 and all(CRASH in line for line in left_out), out.stdout
    vol = cfg.parent / "node"
    marker = json.loads((vol / "torchwarm-ready.json").read_text())
    assert [w["precompiled"] for w in marker["workloads"]] == [False, False]
    assert not list((vol / "inductor").glob("dynamo/*/entry"))


def test_the_nodes_model_app_starts_and_computes_right(seed):
    """The model compiled and called under `torchwarm run` (as the node's app, through
    `torchwarm probe`): it exits 0 and its outputs equal eager's."""
    cfg, env = seed
    torchwarm("pull", "-c", str(cfg), "--require", env=env)
    ran = torchwarm("run", "-c", str(cfg), "--", sys.executable, "-m", "torchwarm.cli",
                    "probe", "-c", str(cfg), "--workload", "model", "--json", env=env)  # fmt: skip
    report = json.loads(ran.stdout.strip().splitlines()[-1])
    assert all(s["max_abs_diff"] <= TOLERANCE for s in report["input_sets"]), report


def test_the_nodes_command_app_starts_and_computes_right(seed):
    """The app script under `torchwarm run`: it exits 0 and its output equals eager's."""
    cfg, env = seed
    torchwarm("pull", "-c", str(cfg), "--require", env=env)
    ran = torchwarm("run", "-c", str(cfg), "--", sys.executable, str(APP), "--model",
                    "decorated", env=env)  # fmt: skip
    assert app_report(ran.stdout)["max_abs_diff"] <= TOLERANCE
