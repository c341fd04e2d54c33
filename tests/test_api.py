"""The Python API (`torchwarm.pull`, `torchwarm.activate`), each claim in a fresh process:
it pulls and reports like the CLI, honours `require` and the deadline, and points the
process's torch at the cache. Stores hold a synthetic cache (no compiling)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import WORKLOAD
from factories import inject_env, tree
from synthetic import publish_synthetic

from torchwarm.stores.local import LocalStore

FILES = {"fxgraph/entry": b"graph" * 100, "kernels/k.so": b"so" * 50}


def config(tmp_path: Path, seed: bool = True, **extra) -> Path:
    store = LocalStore(tmp_path / "store")
    if seed:
        publish_synthetic(store, tmp_path / "capture", FILES)
    doc = {"store": store.url, "cache_dir": str(tmp_path / "volume" / "inductor"),
           "workloads": [WORKLOAD], **extra}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter (the app's process); its last line is JSON."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})  # fmt: skip


def last_json(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pull_reports_like_the_cli_and_activate_points_torch_at_the_cache(tmp_path):
    """`torchwarm.pull(config)` installs, writes the marker and returns the report that
    `pull --json` prints; `activate(report)` sets the cache dir and unsets Triton's."""
    cfg = config(tmp_path)
    out = last_json(
        python(f"""
        import json, os, sys
        import torchwarm
        report = torchwarm.pull({str(cfg)!r})
        os.environ["TRITON_CACHE_DIR"] = "/elsewhere"
        torchwarm.activate(report)
        print(json.dumps({{"report": report.to_dict(), "torch": "torch" in sys.modules,
                          "env": {{k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR",
                                  "TRITON_CACHE_DIR", "TORCH_CACHING_PRECOMPILE")}}}}))
    """)
    )
    report = out["report"]
    assert report["status"] == "warm" and report["workloads"][0]["workload"] == "mlp"
    assert tree(tmp_path / "volume" / "inductor") == FILES
    marker = json.loads((tmp_path / "volume" / "torchwarm-ready.json").read_text())
    assert marker["status"] == "warm" and set(report) <= set(marker)
    assert out["env"] == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "volume" / "inductor"),
                          "TRITON_CACHE_DIR": None, "TORCH_CACHING_PRECOMPILE": None}  # fmt: skip
    assert out["torch"] is False  # the API imports no torch of its own


def test_keyword_arguments_override_the_config_as_flags_do(tmp_path):
    """cache_dir= and marker= win over the file, as --cache-dir and --marker do."""
    cfg = config(tmp_path)
    other = tmp_path / "other" / "inductor"
    last_json(
        python(f"""
        import json, torchwarm
        r = torchwarm.pull({str(cfg)!r}, cache_dir={str(other)!r},
                           marker={str(tmp_path / "m.json")!r})
        print(json.dumps(r.status))
    """)
    )
    assert tree(other) == FILES and (tmp_path / "m.json").exists()


def test_fail_open_never_raises_and_require_raises_the_clis_error(tmp_path):
    """No cache: fail-open returns a cold report; require=True raises NoCacheForFingerprint
    (exit code 5, as the CLI) and installs nothing."""
    cfg = config(tmp_path, seed=False)
    out = last_json(
        python(f"""
        import json, torchwarm
        from torchwarm.errors import NoCacheForFingerprint
        cold = torchwarm.pull({str(cfg)!r})
        try:
            torchwarm.pull({str(cfg)!r}, require=True)
            raised = None
        except NoCacheForFingerprint as e:
            raised = [type(e).__name__, e.exit_code, str(e)]
        print(json.dumps({{"cold": cold.to_dict(), "raised": raised}}))
    """)
    )
    assert out["cold"]["status"] == "cold"
    assert "no cache for workload 'mlp'" in out["cold"]["workloads"][0]["reason"]
    assert out["raised"][:2] == ["NoCacheForFingerprint", 5]
    assert not (tmp_path / "volume" / "inductor").exists()


@pytest.mark.timed
@pytest.mark.parametrize("require", [False, True])
def test_the_deadline_holds_in_a_process_with_threads(tmp_path, require):
    """A pull stuck in C (injected) in an app process that runs other threads ends at its
    deadline: cold, or DeadlineExceeded with require=True."""
    cfg = config(tmp_path)
    env = inject_env("torchwarm.node.fetch:sources:c-sleep")
    out = last_json(
        python(
            f"""
        import json, threading, time, torchwarm
        from torchwarm.errors import DeadlineExceeded
        busy = threading.Thread(target=lambda: [time.sleep(0.01) for _ in range(10**6)],
                                daemon=True)
        busy.start()
        t0 = time.monotonic()
        try:
            r = torchwarm.pull({str(cfg)!r}, deadline_s=2, require={require})
            result = r.to_dict()
        except DeadlineExceeded as e:
            result = {{"raised": e.exit_code}}
        print(json.dumps({{"result": result, "seconds": time.monotonic() - t0}}))
    """,
            env,
        )
    )
    assert out["seconds"] < 2 + 2
    if require:
        assert out["result"] == {"raised": 9}
    else:
        assert out["result"]["status"] == "cold" and out["result"]["timed_out"]
    assert not (tmp_path / "volume" / "inductor").exists()


def test_activate_turns_precompile_on_only_where_entries_were_installed(tmp_path):
    """TORCH_CACHING_PRECOMPILE=1 when a workload got its precompiled entries, else unset."""
    out = last_json(
        python("""
        import json, os
        from torchwarm import app_env
        from torchwarm.node.report import PullReport, WorkloadOutcome
        def report(precompiled):
            w = WorkloadOutcome("mlp", "warm", precompiled=precompiled)
            return PullReport("warm", "/cache/inductor", "fp", "file:///s", [w], {})
        base = {"PATH": "/bin"}
        print(json.dumps([app_env(report(True), base), app_env(report(False), base)]))
    """)
    )
    on, off = out
    assert on["TORCH_CACHING_PRECOMPILE"] == "1" and on["TORCHINDUCTOR_CACHE_DIR"] == (
        "/cache/inductor"
    )
    assert "TORCH_CACHING_PRECOMPILE" not in off and off["PATH"] == "/bin"
