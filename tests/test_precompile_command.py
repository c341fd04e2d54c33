"""Precompile for a command workload: the app's own process saves its Dynamo entries (the
hook, torchwarm.seed.hook), and a fresh node's app, started by `torchwarm run`, loads them.

One seed for the module: tests/pc_app.py warmed up as `precompile` and pushed to a local
store. Every node is a new process with its own cache dir; hits are the app's own counters.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from conftest import torchwarm
from factories import manifest as factory_manifest

from torchwarm import config as cfgmod
from torchwarm.env import codeid
from torchwarm.errors import ManifestError
from torchwarm.node import precompile_rules
from torchwarm.seed.processes import code_digest
from torchwarm.spec import manifest as mf
from torchwarm.spec.manifest import Manifest

pytestmark = pytest.mark.usefixtures("trust_the_vector_isa")

APP = Path(__file__).resolve().parent / "pc_app.py"
TOLERANCE = 1e-4


def write_config(root: Path, workloads: list[dict]) -> Path:
    doc = {
        "store": str(root / "store"),
        "cache_dir": str(root / "node" / "inductor"),
        "format": "precompile",
        "workloads": workloads,
    }
    path = root / "torchwarm.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def app_workload(name: str, model: str, code: Path = APP) -> dict:
    """pc_app.py as a command workload (this Python: the fingerprint describes its torch)."""
    argv = [sys.executable, str(APP), "--model", model]
    return {"name": name, "command": argv, "cwd": str(APP.parent), "code": [str(code)]}


def stored_manifest(cfg: Path, workload: str) -> Manifest:
    store = Path(yaml.safe_load(cfg.read_text())["store"])
    (path,) = (store / "manifests").rglob(f"{workload}/*.json")
    return mf.parse(path.read_bytes(), str(path))


def app_report(stdout: str) -> dict:
    """The app's torchwarm_report line: its counters and its distance to eager."""
    (line,) = [s for s in stdout.splitlines() if s.startswith('{"torchwarm_report"')]
    doc = json.loads(line)
    return {**doc["torchwarm_report"]["counters"], "max_abs_diff": doc["max_abs_diff"]}


@dataclass
class Seeded:
    config: Path
    manifest: Manifest

    @property
    def meta(self) -> dict:
        return self.manifest.warmup["precompile"]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    """One precompile warm-up of the plain app, pushed (a compile, its second run and the
    canary: ~40 s on 2 cores)."""
    root = tmp_path_factory.mktemp("pccmd")
    cfg = write_config(root, [app_workload("app", "plain")])
    torchwarm("warmup", "-c", str(cfg), "--push", timeout=600)
    return Seeded(cfg, stored_manifest(cfg, "app"))


@pytest.mark.compile
def test_seed_publishes_entries_a_fresh_run_loaded(seeded):
    """The canary's fresh run hit the Dynamo cache, so the entry is published (kept), and
    the command's second run without precompile found its FX graph in the cache."""
    meta = seeded.meta
    assert meta["entries"] == "kept" and len(meta["dynamo_keys"]) == 1
    assert meta["canary"]["counters"]["dynamo_cache_hit"] == 1
    assert meta["canary"]["counters"]["dynamo_cache_error"] == 0
    fallback = meta["fallback"]["counters"]
    assert fallback["fxgraph_cache_hit"] == 1 and fallback["fxgraph_cache_miss"] == 0


@pytest.mark.compile
def test_identity_holds_the_code_and_the_distributions_the_command_imported(seeded):
    """The identity is the code files' digest, the arguments and each distribution the
    app imported (torch among them), by version and the digest of its RECORD file."""
    ident = seeded.meta["code_identity"]
    assert ident["kind"] == "command" and ident["code_sha256"] == code_digest([APP])
    assert ident["args"] == [str(APP), "--model", "plain"]
    (torch,) = [d for d in ident["distributions"] if d["name"] == "torch"]
    record = metadata.distribution("torch").read_text("RECORD") or ""
    assert torch["version"] == metadata.version("torch")
    assert torch["digest"] == "record:" + hashlib.sha256(record.encode()).hexdigest()


@pytest.mark.compile
def test_fresh_node_app_loads_the_entries(seeded):
    """`pull` into an empty cache dir installs the entries; the app under `torchwarm run`
    (a new process, precompile on) hits the Dynamo cache, compiles no graph, and computes
    what eager does."""
    node = Path(yaml.safe_load(seeded.config.read_text())["cache_dir"])
    shutil.rmtree(node.parent, ignore_errors=True)
    out = torchwarm("pull", "-c", str(seeded.config), "--require")
    assert "precompiled: app" in out.stdout
    ran = torchwarm("run", "-c", str(seeded.config), "--", sys.executable, str(APP),
                    "--model", "plain")  # fmt: skip
    r = app_report(ran.stdout)
    assert r["dynamo_cache_hit"] == 1 and r["dynamo_cache_error"] == 0, r
    assert r["fxgraph_cache_hit"] == r["fxgraph_cache_miss"] == 0, r
    assert r["max_abs_diff"] <= TOLERANCE


def reparsed(m: Manifest, change) -> Manifest:
    """`m` with its precompile fields changed by `change(meta)`, parsed again."""
    doc = json.loads(m.to_json())
    change(doc["warmup"]["precompile"])
    return mf.parse(json.dumps(doc).encode(), "test")


@pytest.mark.compile
def test_another_version_of_a_distribution_leaves_the_entries_out(seeded):
    """The seed imported a torch of another version than this node's: no entries, and the
    line names the distribution and both versions."""

    def older_torch(meta: dict) -> None:
        for d in meta["code_identity"]["distributions"]:
            if d["name"] == "torch":
                d["version"] = "2.13.0.dev0"

    w = cfgmod.load(seeded.config).workloads[0]
    d = precompile_rules.decide(reparsed(seeded.manifest, older_torch), w)
    assert not d.install
    assert f"distribution 'torch' is {metadata.version('torch')} here, 2.13.0.dev0" in d.reason


@pytest.mark.compile
def test_edited_code_on_the_node_leaves_the_entries_out(seeded, tmp_path):
    """The node's copy of the command's code differs: no entries, one line saying so."""
    edited = tmp_path / "pc_app.py"
    edited.write_text(APP.read_text() + "\nSCALE = 2.0\n")
    cfg = write_config(tmp_path, [app_workload("app", "plain", code=edited)])
    d = precompile_rules.decide(seeded.manifest, cfgmod.load(cfg).workloads[0])
    assert not d.install and "code files differ" in d.reason and "\n" not in d.reason


def fake_dist(site: Path, record: str) -> Path:
    """A distribution `fakedist` 1.0 installed under `site` with this RECORD."""
    info = site / "fakedist-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakedist\nVersion: 1.0\n")
    (info / "RECORD").write_text(record)
    return site


def test_a_reinstall_of_other_files_changes_the_distributions_digest(tmp_path):
    """Same name and version, another RECORD (other files' hashes): another digest."""
    site = fake_dist(tmp_path, "fakedist/__init__.py,sha256=AAAA,10\n")
    before = codeid.distribution_identity("fakedist", ["fakedist"], [str(site)])
    fake_dist(tmp_path, "fakedist/__init__.py,sha256=BBBB,10\n")
    after = codeid.distribution_identity("fakedist", ["fakedist"], [str(site)])
    assert before.version == after.version == "1.0"
    assert before.digest != after.digest and before.digest.startswith("record:")


COMMAND_META = {
    "scheme": precompile_rules.SCHEME,
    "code_identity": {"kind": "command", "code_sha256": "c" * 64, "args": ["app.py"],
                      "distributions": [{"name": "torch", "version": "2.13.0",
                                         "digest": "record:" + "d" * 64, "modules": ["torch"]}]},
    "workload_sha256": "e" * 64,
    "dynamo_keys": ["a" * 64],
    "entries": "kept",
    "fallback": {"counters": None},
}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"entries": "maybe"}, "entries is not one of kept, dropped, unchecked"),
        ({"entries": "dropped", "entries_reason": "x"}, "dynamo_keys is not empty"),
        ({"entries": "dropped", "dynamo_keys": []}, "without an entries_reason"),
        ({"code_identity": {"kind": "command", "code_sha256": "c" * 64, "args": []}},
         "distributions"),
    ],
)  # fmt: skip
def test_malformed_command_precompile_fields_are_refused(change, needle):
    """Scheme 2's fields are checked as scheme 1's are: a malformed one refuses the
    manifest in one line."""
    doc = json.loads(factory_manifest(workload="app", fmt="precompile",
                                      warmup={"precompile": COMMAND_META}).to_json())  # fmt: skip
    assert mf.parse(json.dumps(doc).encode(), "m.json").warmup["precompile"] == COMMAND_META
    doc["warmup"]["precompile"].update(change)
    with pytest.raises(ManifestError, match=needle) as e:
        mf.parse(json.dumps(doc).encode(), "m.json")
    assert "\n" not in str(e.value)


def test_a_module_named_from_a_file_that_is_no_identifier_is_accepted():
    """mypyc's group module (`<hash>__mypyc`), which the hook records as a distribution's
    top-level module, passes the manifest check: a seed's manifest is its nodes'."""
    meta = json.loads(json.dumps(COMMAND_META))
    meta["code_identity"]["distributions"][0]["modules"] = ["30fcd47e0b3ef1d7a2e0__mypyc"]
    m = factory_manifest(workload="app", fmt="precompile", warmup={"precompile": meta})
    assert mf.parse(m.to_json(), "m.json").warmup["precompile"] == meta
