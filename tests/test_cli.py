"""The `torchwarm` command line: help, exit codes, one-line errors, `wait` and `ls`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from factories import fields, manifest, minimal_config, write_config

from torchwarm.cli import main
from torchwarm.node import marker as markermod
from torchwarm.spec import keys
from torchwarm.stores.local import LocalStore

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ["fingerprint", "warmup", "push", "pull", "wait", "ls", "probe"]


def run(capsys, *argv):
    """main(argv) in this process: (exit code, stdout, stderr)."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("torchwarm: error:"), err
    return lines[0]


def test_module_help_exits_zero():
    """`python -m torchwarm.cli --help` prints usage and every command, and exits 0."""
    p = subprocess.run(
        [sys.executable, "-m", "torchwarm.cli", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: torchwarm")
    for c in COMMANDS:
        assert c in p.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help_exits_zero(capsys, command):
    """Each subcommand's --help exits 0 and prints its usage."""
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: torchwarm {command}" in capsys.readouterr().out


def test_no_command_is_usage_error(capsys):
    """No command at all is a usage error (exit 2)."""
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_bad_config_exits_2_with_one_line(tmp_path, capsys):
    """A config with an unknown key exits 2 with one stderr line naming the key."""
    path = minimal_config(tmp_path, "colour: blue\n")
    rc, out, err = run(capsys, "ls", "-c", str(path))
    assert rc == 2
    assert "colour" in one_error_line(err)
    assert out == ""


def test_missing_config_exits_2(tmp_path, capsys):
    """A config path that does not exist exits 2 with one stderr line."""
    rc, _, err = run(capsys, "ls", "-c", str(tmp_path / "nope.yaml"))
    assert rc == 2
    one_error_line(err)


def test_bad_config_via_entry_point(tmp_path):
    """The installed `torchwarm` script maps a bad config to exit 2 and one stderr line."""
    script = Path(sys.executable).with_name("torchwarm")
    assert script.exists(), "the package is not installed in this virtualenv"
    path = write_config(tmp_path, "store: [\n")
    p = subprocess.run([str(script), "ls", "-c", str(path)], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert p.returncode == 2
    assert "line" in one_error_line(p.stderr)


def test_ls_and_wait_do_not_import_torch(tmp_path):
    """`ls` and `wait` run without importing torch (they must start fast on a node)."""
    code = (
        "import sys; from torchwarm.cli import main; "
        f"main(['ls', '-c', {str(minimal_config(tmp_path))!r}]); "
        f"main(['wait', '--marker', {str(tmp_path / 'm')!r}, '--timeout', '0']); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_wait_times_out_with_exit_8(tmp_path, capsys):
    """`wait` on a marker that never appears exits 8 after about the timeout."""
    t0 = time.monotonic()
    rc, _, err = run(capsys, "wait", "--marker", str(tmp_path / "ready.json"), "--timeout", "0.3")
    assert rc == 8
    assert 0.3 <= time.monotonic() - t0 < 5
    assert "no ready marker" in one_error_line(err)


def wait_while_written(capsys, path: Path, doc: dict, delay: float) -> tuple[int, str, float]:
    """Run `wait --marker path` while another thread writes `doc` there atomically after
    `delay` seconds; return its exit code, its stdout and how long it waited."""

    def write_later():
        time.sleep(delay)
        tmp = path.parent / ".ready.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)

    t = threading.Thread(target=write_later)
    t.start()
    t0 = time.monotonic()
    try:
        rc, out, _ = run(capsys, "wait", "--marker", str(path), "--timeout", "10")
    finally:
        t.join()
    return rc, out, time.monotonic() - t0


def test_wait_returns_when_marker_appears(tmp_path, capsys):
    """`wait` exits 0 once this boot's marker is written by someone else, and prints its
    status."""
    marker = tmp_path / "ready.json"
    doc = {"status": "warm", "boot_id": markermod.boot_id()}
    rc, out, seconds = wait_while_written(capsys, marker, doc, delay=0.3)
    assert rc == 0
    assert out.strip() == "ready: warm"
    assert 0.25 <= seconds < 5


@pytest.mark.parametrize("stale_boot", ["kernel:another-boot", None])
def test_wait_ignores_a_marker_from_another_boot(tmp_path, capsys, monkeypatch, stale_boot):
    """A marker left by an earlier boot (another boot id, or none: an older torchwarm) does not
    let `wait` through; this boot's marker does."""
    monkeypatch.setenv("TORCHWARM_BOOT_ID", "pod-uid-2")
    marker = tmp_path / "ready.json"
    marker.write_text(json.dumps({"status": "warm", "boot_id": stale_boot}))
    doc = {"status": "cold", "boot_id": "pod-uid-2"}
    rc, out, seconds = wait_while_written(capsys, marker, doc, delay=0.6)
    assert rc == 0 and out.strip() == "ready: cold"
    assert seconds >= 0.5


def test_wait_passes_over_a_marker_nested_too_deep(tmp_path, capsys):
    """A junk marker nested 100,000 deep is foreign junk to `wait`: this boot's marker lets
    it through."""
    marker = tmp_path / "ready.json"
    marker.write_text("[" * 100_000)
    doc = {"status": "warm", "boot_id": markermod.boot_id()}
    rc, out, _ = wait_while_written(capsys, marker, doc, delay=0.3)
    assert rc == 0 and out.strip() == "ready: warm"


def test_ls_empty_store(tmp_path, capsys):
    """`ls` on an empty store says there are no manifests."""
    rc, out, _ = run(capsys, "ls", "-c", str(minimal_config(tmp_path)))
    assert rc == 0
    assert out.startswith("no manifests in file://")


def publish_by_hand(store_root: Path, **kw):
    """Put a manifest in a LocalStore directly; return it."""
    m = manifest(**kw)
    LocalStore(store_root).put(keys.manifest_key(m.workload, m.fingerprint_digest), m.to_json())
    return m


def test_ls_lists_published_manifest(tmp_path, capsys):
    """`ls` shows a stored manifest's workload, fingerprint, format and input sets."""
    m = publish_by_hand(tmp_path / "store", workload="bert", fmt="megacache")
    rc, out, _ = run(capsys, "ls", "-c", str(minimal_config(tmp_path)))
    assert rc == 0
    header, row = out.strip().splitlines()
    assert header.split()[:3] == ["WORKLOAD", "FINGERPRINT", "FORMAT"]
    assert row.split()[:3] == ["bert", m.fingerprint_digest[:12], "megacache"]
    assert row.endswith("4x64(dyn 0)")


def test_ls_json(tmp_path, capsys):
    """`ls --json` prints one JSON object per manifest."""
    publish_by_hand(tmp_path / "store", workload="a")
    publish_by_hand(tmp_path / "store", workload="b", fingerprint=fields(threads=2))
    rc, out, _ = run(capsys, "ls", "-c", str(minimal_config(tmp_path)), "--json")
    assert rc == 0
    docs = [json.loads(line) for line in out.splitlines()]
    assert [(d["workload"], d["format"]) for d in docs] == [("a", "cachedir"), ("b", "cachedir")]


def test_ls_orders_a_workload_by_serial_not_by_clock(tmp_path, capsys):
    """A publisher whose clock was behind wrote the newer manifest (higher serial, older
    created_at): `ls` lists it last, as gc ranks it."""
    store = tmp_path / "store"
    publish_by_hand(store, serial=5, created_at="2026-01-02T00:00:00Z")
    newer = publish_by_hand(store, serial=9, created_at="2025-12-31T00:00:00Z",
                            fingerprint=fields(threads=2))  # fmt: skip
    rc, out, _ = run(capsys, "ls", "-c", str(minimal_config(tmp_path)), "--json")
    assert rc == 0
    docs = [json.loads(line) for line in out.splitlines()]
    assert [d["serial"] for d in docs] == [5, 9]
    assert docs[-1]["fingerprint"] == newer.fingerprint_digest


def test_ls_skips_corrupt_manifest(tmp_path, capsys):
    """`ls` ignores an unparseable manifest instead of failing."""
    m = publish_by_hand(tmp_path / "store")
    LocalStore(tmp_path / "store").put(keys.manifest_key("junk", "0" * 32), b"{")
    rc, out, _ = run(capsys, "ls", "-c", str(minimal_config(tmp_path)), "--json")
    assert rc == 0
    assert [json.loads(line)["fingerprint"] for line in out.splitlines()] == [m.fingerprint_digest]


def test_ls_store_flag_overrides_config(tmp_path, capsys):
    """`--store` replaces the config's store."""
    publish_by_hand(tmp_path / "other")
    url = (tmp_path / "other").as_uri()
    rc, out, _ = run(capsys, "ls", "-c", str(minimal_config(tmp_path)), "--store", url)
    assert rc == 0
    assert "mlp" in out


def test_warmup_without_push_or_out_exits_2(tmp_path, capsys):
    """`warmup` with neither --push nor --out is a usage error (exit 2), compiling nothing."""
    rc, out, err = run(capsys, "warmup", "-c", str(minimal_config(tmp_path)))
    assert rc == 2
    assert "--push" in one_error_line(err)
    assert out == ""


def test_push_without_results_exits_2(tmp_path, capsys):
    """`push --from` an empty folder is a usage error (exit 2)."""
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "push", "-c", str(minimal_config(tmp_path)), "--from",
                     str(tmp_path / "empty"))  # fmt: skip
    assert rc == 2
    assert "no warm-up results" in one_error_line(err)


def test_unsupported_store_scheme_exits_2(tmp_path, capsys):
    """A store URL with an unknown scheme exits 2 with one line."""
    rc, _, err = run(capsys, "ls", "-c", str(minimal_config(tmp_path, store="ftp://x/y")))
    assert rc == 2
    assert "unsupported scheme" in one_error_line(err)
