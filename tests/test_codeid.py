"""codeid: the model code's identity is computed from files, never by importing them."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import torchwarm
from torchwarm.config import CompileOptions, TensorSpec, Workload
from torchwarm.env import codeid
from torchwarm.errors import ConfigError

PKG = {
    "__init__.py": "",
    "model.py": "from .layers import act\n\ndef build():\n    return act\n",
    "layers.py": "SCALE = 1.0\n\ndef act(x):\n    return x * SCALE\n",
    "sub/__init__.py": "",
    "sub/deep.py": "DEPTH = 3\n",
}


def write_pkg(root: Path, name: str = "idpkg", files: dict[str, str] = PKG) -> Path:
    for rel, text in files.items():
        p = root / name / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def ident(root: Path, model: str = "idpkg.model:build") -> codeid.CodeIdentity:
    return codeid.code_identity(model, [str(root)])


def test_same_code_at_another_path_has_the_same_identity(tmp_path):
    """The identity depends on the package's files, not on where it is installed."""
    a = write_pkg(tmp_path / "a")
    b = write_pkg(tmp_path / "b")
    assert ident(a) == ident(b)
    assert ident(a).package == "idpkg" and ident(a).files == 5


@pytest.mark.parametrize("rel", ["layers.py", "sub/deep.py", "__init__.py"])
def test_an_edit_anywhere_in_the_package_changes_it(tmp_path, rel):
    """An edited submodule (not the factory's own file) changes the identity."""
    root = write_pkg(tmp_path)
    before = ident(root)
    path = root / "idpkg" / rel
    path.write_text(path.read_text() + "\nEXTRA = 2\n")
    assert ident(root).sha256 != before.sha256


def test_a_new_or_removed_module_changes_it(tmp_path):
    """Adding a module or deleting one changes the identity."""
    root = write_pkg(tmp_path)
    before = ident(root)
    (root / "idpkg" / "extra.py").write_text("")
    added = ident(root)
    assert added.sha256 != before.sha256 and added.files == before.files + 1
    (root / "idpkg" / "extra.py").unlink()
    (root / "idpkg" / "sub" / "deep.py").unlink()
    assert ident(root).sha256 not in (before.sha256, added.sha256)


def test_bytecode_caches_and_data_files_do_not_count(tmp_path):
    """__pycache__, .pyc and data files (weights, JSON) leave the identity alone."""
    root = write_pkg(tmp_path)
    before = ident(root)
    (root / "idpkg" / "__pycache__").mkdir()
    (root / "idpkg" / "__pycache__" / "layers.cpython-311.pyc").write_bytes(b"\0" * 16)
    (root / "idpkg" / "weights.bin").write_bytes(b"\1" * 64)
    (root / "idpkg" / "config.json").write_text("{}")
    assert ident(root) == before


def test_the_package_is_never_imported(tmp_path):
    """A package whose import would fail is still hashed, and stays out of sys.modules."""
    files = {**PKG, "__init__.py": "raise RuntimeError('imported!')\n"}
    root = write_pkg(tmp_path, "boompkg", files)
    got = codeid.code_identity("boompkg.model:build", [str(root)])
    assert got.package == "boompkg" and got.files == 5
    assert "boompkg" not in sys.modules


def test_the_first_package_on_the_search_path_wins(tmp_path):
    """As with import, the earlier search-path entry provides the package."""
    old = write_pkg(tmp_path / "old")
    new = write_pkg(tmp_path / "new")
    (new / "idpkg" / "layers.py").write_text("SCALE = 2.0\n")
    assert codeid.code_identity("idpkg.model:build", [str(new), str(old)]) == ident(new)
    assert ident(new) != ident(old)


def test_a_top_level_module_is_hashed_with_its_sibling_modules(tmp_path):
    """`mymodel:build` imports siblings by top-level name: an edited sibling changes it."""
    (tmp_path / "mymodel.py").write_text("from helpers import f\n")
    (tmp_path / "helpers.py").write_text("def f(): return 1\n")
    before = codeid.code_identity("mymodel:build", [str(tmp_path)])
    assert before.package == "mymodel" and before.files == 2
    (tmp_path / "helpers.py").write_text("def f(): return 2\n")
    assert codeid.code_identity("mymodel:build", [str(tmp_path)]).sha256 != before.sha256


def test_without_a_search_path_the_interpreters_finders_are_used():
    """An editable install (a meta-path finder, not a sys.path entry, as torchwarm's own
    dev install) is found and hashed without a search path."""
    agent = Path(torchwarm.__file__).parent
    expected = sum(1 for p in agent.rglob("*.py") if "__pycache__" not in p.parts)
    got = codeid.code_identity("torchwarm.models:mlp")
    assert got.package == "torchwarm" and got.files == expected


def test_a_missing_package_is_a_config_error_naming_it(tmp_path):
    """Nothing on the path provides the package: ConfigError with its name."""
    with pytest.raises(ConfigError, match="'nosuchpkg' is not on"):
        codeid.code_identity("nosuchpkg.model:build", [str(tmp_path)])


def test_an_empty_package_folder_still_hashes(tmp_path):
    """A namespace package (no __init__.py) is found and hashed like a regular one."""
    write_pkg(tmp_path, "nspkg", {"model.py": "X = 1\n"})
    got = codeid.code_identity("nspkg.model:build", [str(tmp_path)])
    assert got.files == 1
    shutil.rmtree(tmp_path / "nspkg")
    with pytest.raises(ConfigError):
        codeid.code_identity("nspkg.model:build", [str(tmp_path)])


def _workload(**changes) -> Workload:
    base = {
        "name": "w",
        "model": "idpkg.model:build",
        "inputs": ((TensorSpec((4, 16)),),),
        "model_kwargs": {"d": 16},
    }
    return Workload(**{**base, **changes})


@pytest.mark.parametrize(
    "change",
    [
        {"model_kwargs": {"d": 32}},
        {"model": "idpkg.model:other"},
        {"mode": "train"},
        {"device": "cuda"},
        {"compile": CompileOptions(fullgraph=True)},
        {"method": "generate", "compile": CompileOptions(target="forward")},
        {"compile": CompileOptions(target="forward")},
        {"kwargs": ({"max_new_tokens": 4},)},
        {"kwargs": ({"mask": TensorSpec((4, 16), "int64")},)},
    ],
)
def test_workload_identity_changes_with_what_shapes_the_code(change):
    """Model, its arguments, mode, device, compile options and target, the method called
    and the keyword inputs (constants by value, tensors by name) are in the identity."""
    assert codeid.workload_identity(_workload(**change)) != codeid.workload_identity(_workload())


def test_workload_identity_without_the_new_keys_is_unchanged():
    """A workload with no method, target or keyword inputs keeps the identity it had before
    they existed (computed on 495aef0): its precompiled entries still install."""
    assert codeid.workload_identity(_workload()) == (
        "3e2b6267ef5c4f652a27dcfc4882411c2d3871aa26b6d87403b924162477e1c4"
    )


def test_workload_identity_ignores_keyword_tensor_shapes():
    """A keyword tensor counts by name, not shape: guards check shapes."""
    small = _workload(kwargs=({"mask": TensorSpec((1, 16), "int64"), "n": 4},))
    large = _workload(kwargs=({"mask": TensorSpec((8, 16), "int64"), "n": 4},))
    assert codeid.workload_identity(small) == codeid.workload_identity(large)


def test_workload_identity_ignores_name_inputs_and_seed():
    """Input shapes are guarded by torch and the seed only changes weights: not in it."""
    other = _workload(name="v", inputs=((TensorSpec((1, 16)),),), seed=7)
    assert codeid.workload_identity(other) == codeid.workload_identity(_workload())
