"""The precompile format end to end: one seed warm-up, then fresh node processes.

The model is a tiny package written into a temp dir and put on PYTHONPATH, so that a
node can be given an edited copy of it. Every node is a new process with its own cache
dir, filled by the format's own install; hits are read from torch's counters.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import torchwarm

from torchwarm import config as cfgmod
from torchwarm.config import Workload
from torchwarm.env import codeid
from torchwarm.formats import get as get_format
from torchwarm.node import precompile_rules as precompile
from torchwarm.node.job import unpacked_bytes
from torchwarm.seed.publish import build_manifest, publish_warmup
from torchwarm.seed.warmup import WarmupResult
from torchwarm.spec.manifest import Manifest
from torchwarm.stores.local import LocalStore

pytestmark = [pytest.mark.compile, pytest.mark.usefixtures("trust_the_vector_isa")]

LAYERS = """import torch

SCALE = 1.0


def act(x):
    return torch.nn.functional.gelu(x) * SCALE


def act2(x):
    return torch.relu(x) * SCALE
"""
MODEL = """from torch import nn

from .layers import act, act2


class Tiny(nn.Module):
    def __init__(self, d=16, kind="gelu"):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.f = act if kind == "gelu" else act2

    def forward(self, x):
        return self.b(self.f(self.a(x)))


def tiny(**kwargs):
    return Tiny(**kwargs)
"""
WORKLOAD = {
    "name": "tiny",
    "model": "pctiny.model:tiny",
    "model_kwargs": {"d": 16},
    "inputs": [[{"shape": [4, 16]}], [{"shape": [1, 16]}]],
}
N_SETS = 2
CLOSE = 1e-4


def write_package(root: Path, scale: str = "1.0") -> Path:
    pkg = root / "pctiny"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "layers.py").write_text(LAYERS.replace("SCALE = 1.0", f"SCALE = {scale}"))
    (pkg / "model.py").write_text(MODEL)
    return root


def write_config(path: Path, **changes) -> Path:
    doc = {
        "store": (path.parent / "unused-store").as_uri(),
        "cache_dir": str(path.parent / "unused-cache"),
        "format": "precompile",
        "workloads": [{**WORKLOAD, **changes}],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@dataclass
class PcSeed:
    app: Path  # the package's folder, as on the seed
    result: WarmupResult
    manifest: Manifest

    @property
    def blobs(self) -> dict[str, Path]:
        return {c.role: c.path for c in self.result.captured}


@pytest.fixture(scope="module")  # after trust_the_vector_isa, which is module-scoped
def pc_seed(tmp_path_factory: pytest.TempPathFactory) -> PcSeed:
    """One precompile warm-up of the tiny package (a compile: ~20 s on 2 cores)."""
    root = tmp_path_factory.mktemp("pcseed")
    app = write_package(root / "app")
    cfg = write_config(root / "seed.yaml")
    torchwarm("warmup", "-c", str(cfg), "--out", str(root / "out"), env={"PYTHONPATH": str(app)})
    result = WarmupResult.load(root / "out" / "tiny")
    m, _ = build_manifest(
        "tiny", result.fingerprint, result.format, result.captured, result.summary
    )
    return PcSeed(app, result, m)


def install_node(seed: PcSeed, dest: Path, precompiled: bool) -> Path:
    """An empty cache dir filled by the format's own install (what a pull does)."""
    dest.mkdir(parents=True)
    get_format("precompile").install(seed.blobs, dest, precompiled=precompiled)
    return dest


def probe(cache: Path, app: Path, precompile_on: bool, **changes) -> dict:
    """Compile and run the workload in a new process against `cache`; its JSON report."""
    cfg = write_config(cache.parent / "probe.yaml", **changes)
    env = {"PYTHONPATH": str(app), "TORCH_CACHING_PRECOMPILE": "1" if precompile_on else "0"}
    out = torchwarm("probe", "-c", str(cfg), "--cache-dir", str(cache), "--json", env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def node_workload(tmp_path: Path, **changes) -> Workload:
    """The workload as the node's config states it."""
    return cfgmod.load(write_config(tmp_path / "node.yaml", **changes)).workloads[0]


def right_numbers(report: dict) -> bool:
    return all(s["max_abs_diff"] < CLOSE for s in report["input_sets"])


def test_seed_records_code_identity_and_a_warm_fx_graph_path(pc_seed):
    """The manifest names the package's identity as the node computes it from files, and
    the seed's second pass without precompile found every FX graph in the cache."""
    meta = pc_seed.manifest.warmup["precompile"]
    assert (
        meta["code_identity"]
        == codeid.code_identity(WORKLOAD["model"], [str(pc_seed.app)]).to_dict()
    )
    assert len(meta["dynamo_keys"]) == 1
    fb = meta["fallback"]["counters"]
    assert fb["fxgraph_cache_hit"] == N_SETS and fb["fxgraph_cache_miss"] == 0


def test_fresh_node_skips_dynamo_and_inductor(pc_seed, tmp_path):
    """Entries installed and TORCH_CACHING_PRECOMPILE=1: a Dynamo cache hit, no FX-graph or
    AOTAutograd lookup at all, no kernel compiled, outputs equal eager."""
    assert precompile.decide(
        pc_seed.manifest, node_workload(tmp_path), (), [str(pc_seed.app)]
    ).install
    cache = install_node(pc_seed, tmp_path / "n" / "inductor", precompiled=True)
    r = probe(cache, pc_seed.app, precompile_on=True)
    c = r["counters"]
    assert c["dynamo_cache_hit"] == 1 and c["dynamo_cache_miss"] == 0
    assert c["fxgraph_cache_hit"] == c["fxgraph_cache_miss"] == 0
    assert c["autograd_cache_hit"] == c["autograd_cache_miss"] == 0
    assert r["new_so_files"] == 0 and right_numbers(r)


def test_other_weights_give_the_right_numbers(pc_seed, tmp_path):
    """Another seed (other weights) still hits: weights are inputs of the compiled graph."""
    cache = install_node(pc_seed, tmp_path / "n" / "inductor", precompiled=True)
    r = probe(cache, pc_seed.app, precompile_on=True, seed=7)
    assert r["counters"]["dynamo_cache_hit"] == 1 and right_numbers(r)


def test_a_shape_never_warmed_compiles_correctly(pc_seed, tmp_path):
    """After loading the entries, a new batch size fails the guards and compiles (torch
    2.13 crashed here until the seed moved Dynamo's name counter), with right numbers."""
    cache = install_node(pc_seed, tmp_path / "n" / "inductor", precompiled=True)
    inputs = [*WORKLOAD["inputs"], [{"shape": [7, 16]}]]
    r = probe(cache, pc_seed.app, precompile_on=True, inputs=inputs)
    assert r["counters"]["dynamo_cache_hit"] == 1
    assert r["counters"]["fxgraph_cache_miss"] >= 1  # batch 7 was compiled here
    assert right_numbers(r) and len(r["input_sets"]) == 3


def stale_copy(tmp_path: Path) -> Path:
    """The app's package with an edited submodule: a constant torch does not guard."""
    return write_package(tmp_path / "stale-app", scale="2.0")


def test_stale_code_installs_no_entry_and_computes_right_numbers(pc_seed, tmp_path):
    """The node's package differs in a submodule: decide says no in one line, the
    install leaves the entries out, and the app (precompile on) computes right numbers."""
    app = stale_copy(tmp_path)
    d = precompile.decide(pc_seed.manifest, node_workload(tmp_path), (), [str(app)])
    assert not d.install and "model code differs" in d.reason and "\n" not in d.reason
    cache = install_node(pc_seed, tmp_path / "n" / "inductor", precompiled=d.install)
    assert not (cache / "dynamo").exists()
    r = probe(cache, app, precompile_on=True)
    assert r["counters"]["dynamo_cache_hit"] == 0 and right_numbers(r)


def test_why_the_check_exists_stale_entries_run_the_seeds_code(pc_seed, tmp_path):
    """Installed anyway, torch 2.13 loads the stale entry and computes the seed's numbers
    (the edited constant is not guarded): what decide() prevents."""
    app = stale_copy(tmp_path)
    cache = install_node(pc_seed, tmp_path / "n" / "inductor", precompiled=True)
    r = probe(cache, app, precompile_on=True)
    assert r["counters"]["dynamo_cache_hit"] == 1
    assert max(s["max_abs_diff"] for s in r["input_sets"]) > 0.1


def test_app_without_precompile_hits_the_fx_graph_cache(pc_seed, tmp_path):
    """Same install, app without TORCH_CACHING_PRECOMPILE: FX-graph and AOTAutograd hits."""
    cache = install_node(pc_seed, tmp_path / "n" / "inductor", precompiled=True)
    r = probe(cache, pc_seed.app, precompile_on=False)
    c = r["counters"]
    assert c["dynamo_cache_hit"] == 0
    assert c["fxgraph_cache_hit"] == N_SETS and c["fxgraph_cache_miss"] == 0
    assert c["autograd_cache_hit"] == N_SETS and c["autograd_cache_miss"] == 0
    assert r["new_so_files"] == 0 and right_numbers(r)


def test_the_free_space_check_asks_for_what_the_install_writes(pc_seed, tmp_path):
    """The manifest's unpacked size, which a node's free-space check adds to the download,
    covers the whole install, precompiled Dynamo entries included."""
    cache = install_node(pc_seed, tmp_path / "n" / "inductor", precompiled=True)
    written = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    assert unpacked_bytes(pc_seed.manifest) >= written > 0


def test_train_mode_is_refused_at_warmup_in_one_line(tmp_path):
    """A training workload: the warm-up fails before compiling and says why."""
    cfg = write_config(tmp_path / "train.yaml", mode="train")
    out = torchwarm("warmup", "-c", str(cfg), "--out", str(tmp_path / "out"), check=False)
    assert out.returncode != 0
    (line,) = out.stderr.strip().splitlines()
    assert "mode: train" in line and "format cachedir" in line


def pull_node(seed: PcSeed, tmp_path: Path, app: Path) -> tuple[Path, dict[str, str]]:
    """A local store holding the seed's capture, a node config, and the node's environment
    (the app's package on PYTHONPATH, as the node agent runs in the app's image)."""
    store = LocalStore(tmp_path / "store")
    publish_warmup(store, seed.result)
    cfg = write_config(tmp_path / "node.yaml")
    doc = yaml.safe_load(cfg.read_text())
    doc.update(store=store.url, cache_dir=str(tmp_path / "vol" / "inductor"))
    cfg.write_text(yaml.safe_dump(doc))
    return cfg, {"PYTHONPATH": str(app)}


SHOW_ENV = "import json, os; print(json.dumps(dict(os.environ)))"


def test_pull_installs_the_entries_and_run_turns_precompile_on(pc_seed, tmp_path):
    """`pull` installs the entries (the marker says precompiled), `run` starts the app with
    TORCH_CACHING_PRECOMPILE=1, and the app's first call is a Dynamo cache hit."""
    cfg, env = pull_node(pc_seed, tmp_path, pc_seed.app)
    out = torchwarm("pull", "-c", str(cfg), "--require", env=env)
    assert "precompiled: tiny" in out.stdout
    marker = json.loads((tmp_path / "vol" / "torchwarm-ready.json").read_text())
    assert marker["workloads"][0]["precompiled"] is True
    ran = torchwarm("run", "-c", str(cfg), "--", sys.executable, "-c", SHOW_ENV, env=env)
    app_env = json.loads(ran.stdout.strip().splitlines()[-1])
    assert app_env["TORCH_CACHING_PRECOMPILE"] == "1"
    r = probe(tmp_path / "vol" / "inductor", pc_seed.app, precompile_on=True)
    assert r["counters"]["dynamo_cache_hit"] == 1 and right_numbers(r)


def test_pull_with_stale_code_leaves_the_entries_out_and_says_why(pc_seed, tmp_path):
    """The node's package differs in a submodule: the pull installs the capture without its
    entries and says why in one line; `run` leaves precompile off; the app computes the
    right numbers (its graph differs too, so it compiles: no entry is used)."""
    app = stale_copy(tmp_path)
    cfg, env = pull_node(pc_seed, tmp_path, app)
    out = torchwarm("pull", "-c", str(cfg), "--require", env=env)
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("precompiled entries left out")]
    assert "model code differs" in line
    marker = json.loads((tmp_path / "vol" / "torchwarm-ready.json").read_text())
    (w,) = marker["workloads"]
    assert w["status"] == "warm" and w["precompiled"] is False
    assert "model code differs" in w["precompile_reason"]
    assert not (tmp_path / "vol" / "inductor" / "dynamo").exists()
    ran = torchwarm("run", "-c", str(cfg), "--", sys.executable, "-c", SHOW_ENV, env=env)
    assert "TORCH_CACHING_PRECOMPILE" not in json.loads(ran.stdout.strip().splitlines()[-1])
    r = probe(tmp_path / "vol" / "inductor", app, precompile_on=False)
    assert r["counters"]["dynamo_cache_hit"] == 0 and right_numbers(r)
