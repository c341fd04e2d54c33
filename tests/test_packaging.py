"""What `pip install torchwarm` gives: every third-party module the code imports is a
declared dependency, the package installs and imports as `torchwarm` (nothing named
`agent` in site-packages), and a clean virtualenv without extras runs the node's path."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
import yaml
from conftest import WORKLOAD
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "agent"


def declared() -> set[str]:
    """The distributions pyproject.toml declares (no extras), normalised."""
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {
        _norm(re.split(r"[<>=~!\[; ]", d, maxsplit=1)[0]) for d in doc["project"]["dependencies"]
    }


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> dict[str, set[str]]:
    """Module imported by agent/ (absolute imports only) -> the files that import it."""
    found: dict[str, set[str]] = {}
    for path in AGENT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name, set()).add(path.name)
    return found


def owners(module: str) -> set[str]:
    """The installed distributions that provide `module`. For a namespace package (google.*)
    only those holding the module's own folder: google.auth is google-auth's."""
    top = module.split(".")[0]
    dists = metadata.packages_distributions().get(top, [])
    if len(dists) <= 1:
        return {_norm(d) for d in dists}
    folder = "/".join(module.split(".")[:2])
    return {
        _norm(d)
        for d in dists
        if any(str(f).startswith((folder + "/", folder + ".")) for f in metadata.files(d) or [])
    }


def test_every_directly_imported_third_party_module_is_declared():
    """Each module agent/ imports is the standard library's, torchwarm's own, or belongs to
    a distribution named in [project.dependencies] (not one that only comes along)."""
    stdlib = set(sys.stdlib_module_names)
    missing = {}
    for module, files in imported_modules().items():
        if module.split(".")[0] in (*stdlib, "torchwarm", "__future__"):
            continue
        dists = owners(module)
        if not dists & declared():
            missing[module] = (sorted(dists), sorted(files))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_the_declared_torch_range_is_the_tested_minor():
    """pyproject.toml admits the torch this suite runs on, any patch release of its minor,
    and nothing older or newer; it is what torchwarm.env.compat supports."""
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = doc["project"]["dependencies"]
    (spec,) = [m[1] for d in deps if (m := re.fullmatch(r"torch\s*([<>=!~][^;\[]*)", d))]
    tested = Version(metadata.version("torch"))
    major, minor = tested.major, tested.minor
    declared = SpecifierSet(spec)
    assert declared.contains(tested.base_version)
    assert declared.contains(f"{major}.{minor}.99")
    assert not declared.contains(f"{major}.{minor - 1}.99")
    assert not declared.contains(f"{major}.{minor + 1}.0")
    from torchwarm.env import compat  # after: the range is what this test is about

    assert ((major, minor),) == compat.SUPPORTED
    assert spec == compat.requirement()


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory) -> Path:
    """A new virtualenv with `pip install .` (no extras). torch, which the package needs,
    is the CPU build already installed here (a copy would be 1.5 GB): this venv sees it
    through a .pth file naming a folder that holds only torch and the packages torch
    itself requires; everything else comes from pip resolving torchwarm's own metadata."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                               "['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())  # fmt: skip
    torch_only = tmp_path_factory.mktemp("torch-only")
    here = Path(sysconfig.get_paths()["purelib"])
    for dist in _torch_closure():
        for f in dist.files or []:
            top = f.parts[0]
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            if not (torch_only / top).exists() and (here / top).exists():
                (torch_only / top).symlink_to(here / top)
    (site / "torch-only.pth").write_text(str(torch_only) + "\n")
    # --no-compile: pip's byte-compiling of every installed module (botocore's thousands)
    # was half the install, and nothing here reads a .pyc (PYTHONDONTWRITEBYTECODE or not).
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-compile", str(ROOT)],
                   check=True, timeout=900)  # fmt: skip
    return venv


def _torch_closure() -> list[metadata.Distribution]:
    """torch and what torch requires, transitively (what `pip install torch` would add)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = ["torch"]
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = dist
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.split(r"[<>=~!\[; (]", req, maxsplit=1)[0])
    return list(seen.values())


def test_installs_as_torchwarm_with_no_top_level_agent(clean_venv):
    """site-packages holds `torchwarm` and no `agent`; `import torchwarm` works."""
    py = clean_venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                               "['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())  # fmt: skip
    assert (site / "torchwarm" / "__init__.py").is_file()
    assert not (site / "agent").exists()
    code = "import torchwarm, torchwarm.cli; print(torchwarm.__file__)"
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True,
                         cwd="/")  # fmt: skip
    assert out.stdout.strip().startswith(str(site / "torchwarm"))


def test_clean_install_runs_help_keygen_and_a_local_pull(clean_venv, tmp_path):
    """Without extras: `--help`, `keygen`, and a local-folder pull of a signed cache, with an
    app module named `agent` first on the path, which torchwarm does not touch."""
    bin_ = clean_venv / "bin"
    app = tmp_path / "app"
    (app / "agent").mkdir(parents=True)
    (app / "agent" / "__init__.py").write_text("raise ImportError('the app's own agent')\n")
    env = {**os.environ, "PYTHONPATH": str(app)}
    env.pop("VIRTUAL_ENV", None)

    def tw(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(bin_ / "torchwarm"), *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=120)  # fmt: skip

    assert tw("--help").returncode == 0
    keygen = tw("keygen", "seed-1", "--out", str(tmp_path))
    assert keygen.returncode == 0, keygen.stderr
    public = (tmp_path / "seed-1.pub").read_text().strip()
    # A seed in this venv: publish a made-up capture, signed with the key keygen wrote.
    store = tmp_path / "store"
    code = textwrap.dedent(f"""
        from pathlib import Path
        from torchwarm.spec import archive, signing
        from torchwarm.env import fingerprint
        from torchwarm.formats import Captured
        from torchwarm.seed.publish import build_manifest, publish
        from torchwarm.stores.local import LocalStore
        tree = Path({str(tmp_path / "tree")!r})
        (tree / "fxgraph").mkdir(parents=True)
        (tree / "fxgraph" / "e").write_bytes(b"x" * 64)
        blob = Path({str(tmp_path / "c.tar.zst")!r})
        archive.write(tree, ["fxgraph/e"], blob)
        m, files = build_manifest("mlp", fingerprint.collect(), "cachedir",
                                  [Captured("cachedir", blob, archive.MEDIA_TYPE)], {{}})
        key = signing.load_secret_file(Path({str(tmp_path / "seed-1.secret")!r}))
        publish(LocalStore(Path({str(store)!r})), m, files, key)
    """)
    subprocess.run([str(bin_ / "python"), "-c", code], check=True, env=env, cwd=tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"store": str(store), "cache_dir": str(tmp_path / "n" / "c"),
                                   "trusted_keys": [public], "workloads": [WORKLOAD]}))  # fmt: skip
    pull = tw("pull", "-c", str(cfg), "--require")
    assert pull.returncode == 0, pull.stderr
    assert "warm: mlp" in pull.stdout
    assert (tmp_path / "n" / "c" / "fxgraph" / "e").read_bytes() == b"x" * 64
