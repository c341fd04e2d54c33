"""The precompile format's rules without compiling: the node's decision, the manifest's
precompile fields, what `torchwarm run` adds, and what install writes or removes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import Member, hand_archive, make_tree, manifest, read_tree
from test_codeid import write_pkg

from torchwarm.config import TensorSpec, Workload
from torchwarm.env import codeid
from torchwarm.errors import ArchiveError, ManifestError
from torchwarm.formats import get as get_format
from torchwarm.node import precompile_rules as precompile
from torchwarm.spec import archive
from torchwarm.spec import manifest as mf

KEY_A, KEY_B = "a" * 64, "b" * 64
WHERE = "manifests/v1/tiny/x.json"


def workload(**changes) -> Workload:
    base = {"name": "tiny", "model": "idpkg.model:build", "inputs": ((TensorSpec((4, 16)),),)}
    return Workload(**{**base, **changes})


def pc_manifest(root: Path, w: Workload | None = None, keys=(KEY_A,), **meta_changes):
    """A precompile manifest whose fields describe the package under `root` and `w`."""
    w = w or workload()
    meta = {
        "scheme": precompile.SCHEME,
        "code_identity": codeid.code_identity(w.model, [str(root)]).to_dict(),
        "workload_sha256": codeid.workload_identity(w),
        "dynamo_keys": list(keys),
        "fallback": {"counters": {}},
        "entries": "kept",
        **meta_changes,
    }
    return manifest(workload=w.name, fmt="precompile", warmup={"precompile": meta})


@pytest.fixture
def pkg(tmp_path: Path) -> Path:
    return write_pkg(tmp_path / "app")


def decide(m, w=None, others=(), root: Path | None = None):
    d = precompile.decide(m, w or workload(), others, [str(root)] if root else None)
    assert "\n" not in d.reason
    return d


def test_same_code_and_settings_may_install(pkg):
    """Seed and node agree on code and settings: the entries may be installed."""
    assert decide(pc_manifest(pkg), root=pkg) == precompile.Decision(True, "")


def test_an_edited_submodule_on_the_node_leaves_the_entries_out(pkg, tmp_path):
    """The node's package differs in a submodule: no entries, one line naming the package."""
    m = pc_manifest(pkg)
    (pkg / "idpkg" / "layers.py").write_text("SCALE = 2.0\n\ndef act(x):\n    return x * SCALE\n")
    d = decide(m, root=pkg)
    assert not d.install
    assert "model code differs" in d.reason and "'idpkg'" in d.reason


def test_a_node_without_the_package_leaves_the_entries_out(pkg, tmp_path):
    """The pull cannot find the model's package: no entries, and the reason says so."""
    d = decide(pc_manifest(pkg), root=tmp_path / "empty")
    assert not d.install and "cannot hash the model code" in d.reason and "idpkg" in d.reason


@pytest.mark.parametrize(
    "change", [{"model_kwargs": {"act": "relu"}}, {"device": "cuda"}, {"mode": "train"}]
)
def test_other_workload_settings_leave_the_entries_out(pkg, change):
    """Torch drops identity guards: another model_kwargs, device or mode must not load."""
    d = decide(pc_manifest(pkg), workload(**change), root=pkg)
    assert not d.install and d.reason


def test_other_input_shapes_and_seed_do_not_matter(pkg):
    """Inputs are guarded by torch and weights are inputs: the entries may be installed."""
    w = workload(inputs=((TensorSpec((9, 16)),),), seed=3)
    assert decide(pc_manifest(pkg), w, root=pkg).install


def test_an_unknown_scheme_leaves_the_entries_out(pkg):
    """A newer seed's precompile fields: left out, telling to upgrade."""
    d = decide(pc_manifest(pkg, scheme=precompile.SCHEME + 1), root=pkg)
    assert not d.install and "upgrade torchwarm" in d.reason


def test_other_formats_carry_no_entries(pkg):
    """A cachedir manifest: nothing precompiled to install."""
    d = decide(manifest(workload="tiny"), root=pkg)
    assert not d.install and "carries no precompiled entries" in d.reason


def test_two_workloads_with_one_dynamo_key_both_leave_their_entries_out(pkg):
    """Torch keys entries by qualname and line: two workloads sharing one are both refused."""
    a = pc_manifest(pkg, keys=(KEY_A,))
    other_w = workload(name="other", model_kwargs={"d": 8})
    b = pc_manifest(pkg, other_w, keys=(KEY_A, KEY_B))
    assert "'other'" in decide(a, others=[a, b], root=pkg).reason
    assert "'tiny'" in decide(b, other_w, others=[a, b], root=pkg).reason
    c = pc_manifest(pkg, other_w, keys=(KEY_B,))
    assert decide(a, others=[a, c], root=pkg).install


def test_app_env_sets_precompile_only_when_entries_were_installed():
    """`torchwarm run` adds TORCH_CACHING_PRECOMPILE=1 only after an install of entries."""
    assert precompile.app_env([{"precompiled": True}, {"precompiled": False}]) == {
        "TORCH_CACHING_PRECOMPILE": "1"
    }
    assert precompile.app_env([{"precompiled": False}, {"status": "cold"}]) == {}
    assert precompile.app_env([]) == {}


def test_precompile_manifest_round_trips(pkg):
    """parse(to_json()) gives back the precompile manifest with its fields."""
    m = pc_manifest(pkg)
    assert mf.parse(m.to_json(), WHERE) == m


@pytest.mark.parametrize(
    ("meta", "needle"),
    [
        (None, "needs an object warmup.precompile"),
        ({"scheme": "1"}, "scheme is not an integer"),
        ({"scheme": 1, "workload_sha256": KEY_A, "dynamo_keys": [KEY_A]}, "code_identity"),
        ({"dynamo_keys": []}, "dynamo_keys"),
        ({"dynamo_keys": ["../x"]}, "dynamo_keys"),
        ({"workload_sha256": "XYZ"}, "workload_sha256"),
    ],
)
def test_malformed_precompile_fields_are_refused(pkg, meta, needle):
    """The node decides from these fields: a malformed one refuses the manifest, one line."""
    doc = json.loads(pc_manifest(pkg).to_json())
    if meta is None or "scheme" in meta:
        doc["warmup"]["precompile"] = meta
    else:
        doc["warmup"]["precompile"].update(meta)
    with pytest.raises(ManifestError, match=needle) as e:
        mf.parse(json.dumps(doc).encode(), WHERE)
    assert "\n" not in str(e.value)


def test_precompile_manifest_needs_both_blobs(pkg):
    """A precompile manifest names exactly a cachedir and a dynamo blob."""
    doc = json.loads(pc_manifest(pkg).to_json())
    doc["blobs"] = [b for b in doc["blobs"] if b["role"] == "cachedir"]
    with pytest.raises(ManifestError, match="needs blobs"):
        mf.parse(json.dumps(doc).encode(), WHERE)


def blobs_of(tmp_path: Path, key: str = KEY_A, entry: bytes = b"entry") -> dict[str, Path]:
    """Hand-made blob files of a precompile capture."""
    rest = make_tree(tmp_path / "seed", {"fxgraph/ab/f": b"graph", "th/k.so": b"so"})
    cachedir = tmp_path / "cachedir.tar.zst"
    archive.write(rest, ["fxgraph/ab/f", "th/k.so"], cachedir)
    dyn = hand_archive(tmp_path / "dynamo.tar.zst", [Member(f"dynamo/{key}/entry", entry)])
    return {"cachedir": cachedir, "dynamo": dyn}


def test_install_with_entries_writes_them(tmp_path):
    """precompiled=True: the cache tree and the Dynamo entries."""
    staging = tmp_path / "staging"
    staging.mkdir()
    get_format("precompile").install(blobs_of(tmp_path), staging, precompiled=True)
    assert set(read_tree(staging)) == {"fxgraph/ab/f", "th/k.so", f"dynamo/{KEY_A}/entry"}


def test_install_without_entries_removes_an_earlier_installs_entry(tmp_path):
    """precompiled=False (the default) leaves the entries out, and removes this capture's
    entry that an earlier pull installed: a stale entry must not outlive its check."""
    staging = make_tree(tmp_path / "staging", {f"dynamo/{KEY_A}/entry": b"old", "x/keep": b"k"})
    make_tree(staging, {f"dynamo/{KEY_B}/entry": b"another workload's"})
    get_format("precompile").install(blobs_of(tmp_path), staging)
    assert set(read_tree(staging)) == {
        "fxgraph/ab/f", "th/k.so", "x/keep", f"dynamo/{KEY_B}/entry",
    }  # fmt: skip


@pytest.mark.parametrize(
    "name", ["fxgraph/ab/f", f"dynamo/{KEY_A}/other", "dynamo/short/entry", "dynamo/entry"]
)
def test_install_refuses_a_dynamo_blob_with_other_files(tmp_path, name):
    """The dynamo blob may hold only dynamo/<sha256>/entry files, whatever `precompiled`."""
    blobs = blobs_of(tmp_path)
    hand_archive(blobs["dynamo"], [Member(name, b"x")])
    for precompiled in (True, False):
        staging = tmp_path / f"staging-{precompiled}"
        staging.mkdir()
        with pytest.raises(ArchiveError, match="not a Dynamo entry"):
            get_format("precompile").install(blobs, staging, precompiled=precompiled)


def test_install_refuses_entries_smuggled_in_the_cachedir_blob(tmp_path):
    """Entries in the cachedir blob would dodge the node's decision: refused."""
    blobs = blobs_of(tmp_path)
    hand_archive(blobs["cachedir"], [Member(f"dynamo/{KEY_A}/entry", b"x")])
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(ArchiveError, match="holds Dynamo entries"):
        get_format("precompile").install(blobs, staging)


def test_cache_members_keeps_dynamo_entries_apart(tmp_path):
    """The cachedir part never lists dynamo/; the dynamo part lists only it."""
    root = make_tree(
        tmp_path / "c",
        {f"dynamo/{KEY_A}/entry": b"e", "fxgraph/f": b"g", "top.so": b"s", "locks/l": b""},
    )
    from torchwarm.formats.base import cache_members

    assert cache_members(root) == ["fxgraph/f", "top.so"]
    assert cache_members(root, dynamo=True) == [f"dynamo/{KEY_A}/entry"]
