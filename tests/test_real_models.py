"""Model workloads over a real library (README "Real-library models"): transformers models
that take keyword inputs and return ModelOutput, called through a method (generate) or a
compiled forward, from a YAML config to a local store to a fresh node, where the app
(examples/hf_app.py, a new process calling the model the same way) hits every graph.

First the warm-up child's handling of such calls, in this process on small modules
(tests/output_models.py) compiled with backend eager: Dynamo only, seconds. Then the real
thing, compiled once per module: configs/hf-llama.yaml's two workloads and a BERT encoder
warm up at once, are pushed once and pulled once; each test reads what it needs from that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import output_models
import pytest
import yaml
from conftest import cli_env, spawn, torchwarm

from torchwarm import config
from torchwarm.config import TensorSpec
from torchwarm.errors import WarmupError
from torchwarm.seed import child

pytestmark = pytest.mark.usefixtures("trust_the_vector_isa")

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
CLOSE = 1e-4  # compiled vs eager, float32 on CPU
MASK = {"shape": [2, 8], "dtype": "float32", "fill": 1}
NESTED_CALL = [{"args": [{"shape": [2, 8]}], "kwargs": {"mask": MASK, "factor": 3}}]


def workload(**doc) -> config.Workload:
    """A model workload as the YAML would give it (backend eager unless `compile` says)."""
    doc = {"name": "toy", "compile": {"backend": "eager"}, **doc}
    return config.parse_workload(doc, "test")


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """child.run's cache dir, as the warm-up child gets it."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))


def test_keyword_inputs_are_made_by_spec_and_constants_passed_as_written():
    """Keyword tensors follow their spec (a fill, dynamic marks); constants are passed as
    is; the positional tensors are what the seed made before keyword inputs existed."""
    import torch

    specs = (TensorSpec((4, 8), dynamic=(0,)),)
    kw = {"mask": TensorSpec((4, 8), "int64", dynamic=(0,), fill=1), "n": 4, "greedy": False}
    args, kwargs = child.make_call(specs, kw, "cpu", 7)
    assert torch.equal(args[0], torch.randn((4, 8), generator=torch.Generator().manual_seed(7)))
    assert kwargs["mask"].dtype == torch.int64 and bool((kwargs["mask"] == 1).all())
    assert kwargs["n"] == 4 and kwargs["greedy"] is False
    assert kwargs["mask"]._dynamo_dynamic_indices == {0}  # what mark_dynamic records


def test_nested_output_is_compared_at_every_depth(cache_env):
    """A dict holding a tuple, a list, a dataclass and an opaque object, from a call with
    keyword inputs: every tensor is compared (the compiled dataclass tensor's +1 is seen),
    the rest skipped."""
    w = workload(model="output_models:nested", inputs=NESTED_CALL)
    (s,) = child.run(w).input_sets
    assert s.max_abs_diff == pytest.approx(1.0)
    assert s.kwargs == {"mask": {"shape": [2, 8], "dtype": "float32", "dynamic": []},
                        "factor": {"value": 3}}  # fmt: skip


def test_train_mode_runs_backward_over_every_floating_tensor(cache_env):
    """Train mode: the backward of the sum of every floating-point tensor in the output
    reaches both layers (one feeds the dict's tensor, the other the tuple's)."""
    w = workload(model="output_models:nested", mode="train", inputs=NESTED_CALL)
    child.run(w)
    model = output_models.BUILT[-1]
    assert model.a.weight.grad is not None and model.b.weight.grad is not None


def test_another_number_of_tensors_compiled_is_a_warmup_error(cache_env):
    """A compiled call that returns more tensors than eager cannot be compared: WarmupError
    naming the input set and both counts."""
    w = workload(model="output_models:more_when_compiled", inputs=[[{"shape": [2, 8]}]])
    counts = r"input set 0: the compiled call returned 2 tensor\(s\), eager 1"
    with pytest.raises(WarmupError, match=counts):
        child.run(w)


def test_target_forward_compiles_forward_and_the_reference_is_eager(cache_env):
    """method step with target forward: step() runs through the compiled forward (+1 per
    call, twice), the reference through the module's own forward, uncompiled; afterwards
    the module has its own forward back."""
    w = workload(
        model="output_models:steps",
        method="step",
        compile={"backend": "eager", "target": "forward"},
        inputs=[[{"shape": [2, 8]}]],
    )
    (s,) = child.run(w).input_sets
    assert s.max_abs_diff == pytest.approx(2.0)
    assert "forward" not in vars(output_models.BUILT[-1])


# The real thing: configs/hf-llama.yaml (tiny_llama forward with keyword inputs, and
# generate through a compiled forward) plus a BERT encoder, compiled by inductor.
BERT = {
    "name": "bert",
    "model": "tiny_hf:tiny_bert",
    "inputs": [{"kwargs": {
        "input_ids": {"shape": [1, 16], "dtype": "int64", "high": 1000},
        "attention_mask": {"shape": [1, 16], "dtype": "int64", "fill": 1},
    }}],
}  # fmt: skip
# The app itself as a command workload: what it compiles is what a node's app compiles.
APP_COMMAND = {
    "name": "llama-app",
    "command": [sys.executable, str(EXAMPLES / "hf_app.py"), "--compile", "forward",
                "--call", "forward"],
    "code": [str(EXAMPLES / "hf_app.py"), str(EXAMPLES / "tiny_hf.py")],
}  # fmt: skip
# How hf_app.py calls the model, for each workload of the example config.
APP_CALLS = {
    "llama-forward": ("--compile", "module", "--call", "forward"),
    "llama-generate": ("--compile", "forward", "--call", "generate"),
}


def python_path() -> str:
    """PYTHONPATH for torchwarm: examples/ first (where tiny_hf is), then the caller's."""
    return os.pathsep.join(p for p in (str(EXAMPLES), os.environ.get("PYTHONPATH")) if p)


@dataclass
class Seeded:
    config: Path
    out: Path  # the warm-ups' folders, one per workload
    store: Path
    cache_dir: Path  # the node's: empty until `node` pulls

    def manifest(self, name: str) -> dict:
        (path,) = (self.store / "manifests").rglob(f"{name}/*.json")
        return json.loads(path.read_text())

    def report(self, name: str) -> dict:
        """What the warm-up child measured (child.run's report)."""
        return json.loads((self.out / name / "child.json").read_text())["report"]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    """The example config with a store and cache dir of its own, BERT and the app as a
    command workload added; its four workloads warmed up at once (each a cold compile in
    its own process), pushed once."""
    root = tmp_path_factory.mktemp("hf")
    doc = yaml.safe_load((REPO / "configs" / "hf-llama.yaml").read_text())
    doc.update(store=str(root / "store"), cache_dir=str(root / "node" / "inductor"))
    doc["workloads"] += [BERT, APP_COMMAND]
    path = root / "hf-llama.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = {"PYTHONPATH": python_path()}
    runs = {
        w["name"]: spawn("warmup", "-c", str(path), "--workload", w["name"], "--out",
                         str(root / "out"), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
        for w in doc["workloads"]
    }  # fmt: skip
    for name, proc in runs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"the warm-up of {name} exited {proc.returncode}\n{out}"
    torchwarm("push", "-c", str(path), "--from", str(root / "out"), env=env)
    return Seeded(path, root / "out", root / "store", root / "node" / "inductor")


@pytest.fixture(scope="module")
def node(seeded: Seeded) -> Path:
    """A fresh node's cache dir: empty, then pulled (every workload, --require)."""
    assert not seeded.cache_dir.exists()
    torchwarm("pull", "-c", str(seeded.config), "--require")
    return seeded.cache_dir


def app(cache_dir: Path, *args: str) -> dict:
    """examples/hf_app.py in a new process on `cache_dir`: its torch counters."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "hf_app.py"), *args],
        env=cli_env({"TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"hf_app.py {' '.join(args)} exited {proc.returncode}\n{proc.stderr}"
    )
    (line,) = [s for s in proc.stdout.splitlines() if s.startswith('{"torchwarm_report"')]
    return json.loads(line)["torchwarm_report"]["counters"]


@pytest.mark.compile
@pytest.mark.parametrize("name", ["llama-forward", "llama-generate", "bert"])
def test_seed_compiles_every_graph_cold_and_matches_eager(seeded, name):
    """Each warm-up (ModelOutput from keyword inputs, generate's token ids, BERT's
    ModelOutput) misses every graph on its empty cache dir (the control for the node's
    hits) and its compiled outputs equal eager's, every tensor compared."""
    c = seeded.manifest(name)["warmup"]["counters"]
    assert c["fxgraph_cache_miss"] > 0 and c["fxgraph_cache_hit"] == 0, c
    assert all(s["max_abs_diff"] < CLOSE for s in seeded.report(name)["input_sets"])


@pytest.mark.compile
@pytest.mark.parametrize("name", sorted(APP_CALLS))
def test_app_on_a_fresh_node_hits_every_graph_of_its_workload(seeded, node, name):
    """After a pull into an empty cache dir, the app calling the model as its workload
    did (a compiled module with keyword inputs; generate through a compiled forward) hits
    every graph the seed compiled, FX-graph and AOTAutograd, and misses none."""
    graphs = seeded.manifest(name)["warmup"]["counters"]["fxgraph_cache_miss"]
    c = app(node, *APP_CALLS[name])
    assert c["fxgraph_cache_hit"] == graphs and c["fxgraph_cache_miss"] == 0, c
    assert c["autograd_cache_hit"] == graphs and c["autograd_cache_miss"] == 0, c


@pytest.mark.compile
def test_the_app_as_a_command_workload_hits_under_run(seeded, tmp_path):
    """A fresh node that pulls only the command workload (hf_app.py, the Llama's forward
    compiled) runs that app under `torchwarm run`: every graph hits, FX-graph and
    AOTAutograd, none misses, and it computes what eager computes."""
    cache_dir, cfg = tmp_path / "node" / "inductor", str(seeded.config)
    torchwarm("pull", "-c", cfg, "--workload", "llama-app", "--require",
              "--cache-dir", str(cache_dir))  # fmt: skip
    app_args = ["--compile", "forward", "--call", "forward", "--digest"]
    proc = torchwarm("run", "-c", cfg, "--workload", "llama-app", "--cache-dir",
                     str(cache_dir), "--", sys.executable, str(EXAMPLES / "hf_app.py"),
                     *app_args)  # fmt: skip
    lines = [json.loads(s) for s in proc.stdout.splitlines() if s.startswith("{")]
    c = next(x["torchwarm_report"]["counters"] for x in lines if "torchwarm_report" in x)
    graphs = seeded.manifest("llama-app")["warmup"]["counters"]["fxgraph_cache_miss"]
    assert graphs >= 1 and c["fxgraph_cache_hit"] == graphs and c["fxgraph_cache_miss"] == 0, c
    assert c["autograd_cache_hit"] == graphs and c["autograd_cache_miss"] == 0, c
    eager = subprocess.run(
        [sys.executable, str(EXAMPLES / "hf_app.py"), "--compile", "none", "--call", "forward",
         "--digest"], env=cli_env({}), capture_output=True, text=True, check=True, timeout=600,
    ).stdout  # fmt: skip
    want = json.loads(eager.strip().splitlines()[-1])["digest"]
    got = next(x["digest"] for x in lines if "digest" in x)
    assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.compile
def test_manifest_names_keyword_inputs_method_and_target(seeded):
    """The manifest's summary lists keyword tensors (name, shape, dtype) and constants
    (name, value), and the method and compile target where they are not the defaults."""
    gen = seeded.manifest("llama-generate")["warmup"]
    assert gen["method"] == "generate" and gen["compile"]["target"] == "forward"
    assert gen["input_sets"] == [[
        {"shape": [1, 16], "dtype": "int64", "dynamic": []},
        {"name": "attention_mask", "shape": [1, 16], "dtype": "int64", "dynamic": []},
        {"name": "max_new_tokens", "value": 4},
        {"name": "do_sample", "value": False},
    ]]  # fmt: skip
    fwd = seeded.manifest("llama-forward")["warmup"]
    assert "method" not in fwd and "target" not in fwd["compile"]
    assert [t["name"] for t in fwd["input_sets"][0]] == ["input_ids", "attention_mask"]


@pytest.mark.compile
def test_ls_shows_keyword_inputs_by_name(seeded):
    """`ls` shows a keyword tensor as name=shape and a constant as name=value."""
    rows = [
        json.loads(line)
        for line in torchwarm("ls", "-c", str(seeded.config), "--json").stdout.splitlines()
    ]
    (gen,) = [r for r in rows if r["workload"] == "llama-generate"]
    assert gen["input_sets"] == "1x16+attention_mask=1x16+max_new_tokens=4+do_sample=false"
