"""A command workload that really compiles (configs/example-command.yaml and its script),
from seed to local store to a fresh node, where the app, a new process running the
same script, hits every FX graph.

Hits are the app's own torch counters, from the report line it prints; the seed's line
(kept in the manifest) is the control: the same script on an empty cache misses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import torchwarm

pytestmark = [pytest.mark.compile, pytest.mark.usefixtures("trust_the_vector_isa")]

REPO = Path(__file__).resolve().parent.parent
GRAPHS = 2  # the script compiles batch 4 (dynamic) and batch 1


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped example, with a store and cache dir of its own, run with this Python,
    warmed up and pushed once."""
    root = tmp_path_factory.mktemp("cmdnode")
    doc = yaml.safe_load((REPO / "configs" / "example-command.yaml").read_text())
    doc.update(store=str(root / "store"), cache_dir=str(root / "node" / "inductor"))
    (w,) = doc["workloads"]
    w["command"][0] = sys.executable  # `python` on PATH may be another one
    w["cwd"] = str(REPO / "configs")
    w["code"] = [str(REPO / "configs" / c) for c in w["code"]]
    path = root / "example-command.yaml"
    path.write_text(yaml.safe_dump(doc))
    torchwarm("warmup", "-c", str(path), "--push")
    return path


def report(stdout: str) -> dict:
    """The counters of the script's torchwarm_report line."""
    (line,) = [s for s in stdout.splitlines() if s.startswith('{"torchwarm_report"')]
    return json.loads(line)["torchwarm_report"]["counters"]


def test_seed_manifest_holds_the_commands_own_cold_counters(config):
    """The manifest keeps what the script reported on the seed's empty cache dir: every
    graph a miss (the control for the hits below), and kernels compiled."""
    store = Path(yaml.safe_load(config.read_text())["store"])
    (path,) = (store / "manifests").rglob("*.json")
    summary = json.loads(path.read_text())["warmup"]
    c = summary["counters"]
    assert c["fxgraph_cache_miss"] == GRAPHS and c["fxgraph_cache_hit"] == 0
    assert summary["so_files"] > 0 and summary["first_call_s"] > 0


def test_app_on_a_fresh_node_hits_every_graph(config):
    """Pull into an empty cache dir, then the app under `torchwarm run` (a new process
    running the same script): FX-graph and AOTAutograd hits, no misses."""
    node = Path(yaml.safe_load(config.read_text())["cache_dir"])
    assert not node.exists()
    torchwarm("pull", "-c", str(config), "--require")
    script = REPO / "examples" / "compile_mlp.py"
    proc = torchwarm("run", "-c", str(config), "--", sys.executable, str(script),
                     "--hidden", "64")  # fmt: skip
    c = report(proc.stdout)
    assert c["fxgraph_cache_hit"] == GRAPHS and c["fxgraph_cache_miss"] == 0, c
    assert c["autograd_cache_hit"] == GRAPHS and c["autograd_cache_miss"] == 0, c


def test_probe_reports_the_commands_counters(config, tmp_path):
    """probe runs the command against a pulled cache dir and prints its reported hits."""
    node = tmp_path / "inductor"
    torchwarm("pull", "-c", str(config), "--cache-dir", str(node), "--require")
    doc = json.loads(torchwarm("probe", "-c", str(config), "--cache-dir", str(node),
                               "--json").stdout)  # fmt: skip
    assert doc["cache_dir"] == str(node) and doc["new_so_files"] == 0
    c = doc["counters"]
    assert c["fxgraph_cache_hit"] == GRAPHS and c["fxgraph_cache_miss"] == 0, c
