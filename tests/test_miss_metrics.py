"""Misses proven in production: a real `torchwarm serve` and a real app process on its cache dir.

The app is `torchwarm probe` with the seed's workload but other input sets, started once
/readyz says 200 (as the kubelet would). Its own torch counters are the control: the
sidecar's counts must match what torch says it missed, and stay 0 when torch says it hit.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import WORKLOAD, Node, spawn, torchwarm, wait_ready
from servers import free_port

pytestmark = pytest.mark.compile

_SAMPLE = re.compile(r"^(torchwarm_\w+)(?:\{kind=\"(\w+)\"\})? (\S+)$")


@dataclass
class Agent:
    port: int
    proc: subprocess.Popen[str]
    out: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Samples by name, `name:kind` for the per-kind counter."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        found = {}
        for line in text.splitlines():
            if m := _SAMPLE.match(line):
                found[m[1] + (f":{m[2]}" if m[2] else "")] = float(m[3])
        return found

    def misses(self) -> dict[str, float]:
        prefix = "torchwarm_cache_misses_total:"
        return {k[len(prefix) :]: v for k, v in self.metrics().items() if k.startswith(prefix)}

    def settle(self) -> dict[str, float]:
        """The counts once two more scans have finished (everything written before is seen)."""
        scans = self.metrics()["torchwarm_miss_scans_total"]
        deadline = time.monotonic() + 60
        while self.metrics()["torchwarm_miss_scans_total"] < scans + 2:
            assert time.monotonic() < deadline, "the watcher stopped scanning"
            time.sleep(0.2)
        return self.misses()


@contextlib.contextmanager
def serving(node: Node) -> Iterator[Agent]:
    """`torchwarm serve` on the node's config, ready; its log lines in `out` once stopped."""
    port = free_port()
    proc = spawn("serve", "-c", str(node.config), "--listen", f"127.0.0.1:{port}",
                 stdout=subprocess.PIPE)  # fmt: skip
    agent = Agent(port, proc)
    try:
        status, body = wait_ready(port, proc, 180)
        assert status == 200, f"the sidecar never got ready: {status} {body!r}"
        yield agent
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        agent.out.extend(out.splitlines())
    assert proc.returncode == 0


def app(node: Node, tmp_path: Path, inputs: list) -> dict:
    """Run the app (a probe of the seed's workload with `inputs`) on the node's cache dir."""
    cfg = yaml.safe_load(node.config.read_text())
    cfg["workloads"] = [{**WORKLOAD, "inputs": inputs}]
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = torchwarm("probe", "-c", str(path), "--json").stdout
    return json.loads(out.strip().splitlines()[-1])


def f32(shape: list[int], dynamic: list[int] | None = None) -> list[dict]:
    return [{"shape": shape, "dtype": "float32", "dynamic": dynamic or []}]


def test_an_input_set_the_warm_up_did_not_cover_is_counted_and_said_once(node_factory, tmp_path):
    """Two uncovered input sets: the counts equal torch's own misses, one line per kind."""
    node = node_factory()
    with serving(node) as agent:
        assert agent.metrics()["torchwarm_miss_watch_up"] == 1
        # batch 8 unmarked (a static graph; the warm-up's batch 4 was marked dynamic) and
        # a rank-3 input: neither was warmed.
        probe = app(node, tmp_path, [f32([8, 32]), f32([2, 4, 32])])
        counts = agent.settle()
    c = probe["counters"]
    assert c["fxgraph_cache_miss"] == 2 and c["fxgraph_cache_hit"] == 0  # the control
    assert counts["fxgraph"] == c["fxgraph_cache_miss"]
    assert counts["aotautograd"] == c["autograd_cache_miss"]
    assert counts["cpu_kernel"] == probe["new_so_files"] >= 1
    assert counts["dynamo"] == counts["triton_kernel"] == 0
    said = [line for line in agent.out if line.startswith("miss (")]
    fx = [line for line in said if line.startswith("miss (fxgraph): ")]
    assert len(fx) == 1 and "the app compiled a graph the warm-up did not cover" in fx[0]
    assert "add the input set" in fx[0] and str(node.cache_dir) in fx[0]
    assert sorted(line.split(")")[0] for line in said) == [
        "miss (aotautograd", "miss (cpu_kernel", "miss (fxgraph"]  # fmt: skip


@pytest.mark.parametrize("fmt", ["cachedir", "megacache"])
def test_an_app_within_the_warmed_input_sets_counts_nothing(node_factory, tmp_path, fmt):
    """Batch 16 (covered by the dynamic batch 4) and batch 1: torch hits, nothing counts."""
    node = node_factory(fmt)
    with serving(node) as agent:
        probe = app(node, tmp_path, [f32([16, 32], [0]), f32([1, 32])])
        counts = agent.settle()
        assert agent.metrics()["torchwarm_miss_watch_up"] == 1
    c = probe["counters"]
    assert c["fxgraph_cache_hit"] == 2 and c["fxgraph_cache_miss"] == 0  # the control
    assert c["autograd_cache_hit"] == 2 and probe["new_so_files"] == 0
    assert set(counts.values()) == {0}
    assert not [line for line in agent.out if line.startswith("miss")]
    assert any(line.startswith("ready (warm)") for line in agent.out)
