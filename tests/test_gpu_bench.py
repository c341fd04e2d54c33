"""bench/gpu.sh runs where the GPU check will: no cloud SDKs, no cryptography, no install.

The GPU machine has only torch, triton and pyyaml (zstandard comes as a carried wheel).
Here the same packages are made unimportable and the script runs on the CPU with a tiny
model, so that CUDA is all that is left untested.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.compile, pytest.mark.usefixtures("trust_the_vector_isa")]

ROOT = Path(__file__).resolve().parent.parent
BLOCKER = """import sys

BLOCKED = {"cryptography", "boto3", "botocore", "s3transfer", "tenacity", "google"}


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on the GPU machine")
        return None


sys.meta_path.insert(0, _Blocked())
"""


def test_gpu_script_runs_without_cloud_packages_and_prints_the_table(tmp_path):
    """One cell (precompile, mode default) end to end: warm-up, push, pull, probes; the
    table names a Dynamo-cache hit on the node, and nothing imported the missing SDKs."""
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": str(tmp_path / "blocker"),
        "OUT": str(out),
    }
    args = ["--device", "cpu", "--tiny", "--modes", "default", "--formats", "precompile"]
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "gpu-table.txt").read_text()
    (row,) = [line for line in table.splitlines() if line.startswith("| default | precompile")]
    assert "dyn 1/0 fx 0/0 aot 0/0" in row and "precompiled" in row
    assert (out / "gpu.log").read_text().count("| default | precompile") == 1
