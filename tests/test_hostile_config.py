"""Hostile config files and TORCHWARM_* variables (#20): each ends in a config error that
names the key or variable, in one line; a node in fail-open mode then starts cold with that
line in its marker, and never installs what its config forbids. What a node does is run in
a fresh process (the real CLI); the store holds a synthetic cache (no compiling)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CLI, WORKLOAD, cli_env, torchwarm
from factories import alias_bomb_inputs, limit_address_space, minimal_config, write_config
from synthetic import publish_synthetic

from torchwarm import config
from torchwarm.errors import ConfigError
from torchwarm.spec import signing
from torchwarm.stores.local import LocalStore

CACHE = {"fxgraph/entry": b"entry" * 64}
APP = ["--", sys.executable, "-c", "print('app started')"]


def node_config(tmp_path: Path, **doc: object) -> Path:
    """A node's YAML beside a local store holding an unsigned synthetic cache for this
    machine; `doc` adds or replaces top-level keys."""
    publish_synthetic(LocalStore(tmp_path / "store"), tmp_path / "capture", CACHE)
    base = {"store": "store", "cache_dir": "node/inductor", "workloads": [WORKLOAD]}
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({**base, **doc}))
    return path


def marker(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "node" / "torchwarm-ready.json").read_text())


def installed(tmp_path: Path) -> bool:
    return (tmp_path / "node" / "inductor" / "fxgraph" / "entry").exists()


@pytest.fixture(scope="module")
def public_key() -> str:
    return signing.load_secret(signing.generate("seed-1")[0], "test").public_text()


# -- row 1: a blank TORCHWARM_TRUSTED_KEYS never turns signature checks off ------------


@pytest.mark.parametrize("blank", [" ", ",", "\t"], ids=["space", "comma", "tab"])
def test_blank_trusted_keys_variable_is_a_config_error_never_an_install(
    tmp_path, public_key, blank
):
    """With trusted_keys in the YAML, a blank $TORCHWARM_TRUSTED_KEYS is a config error: the
    unsigned manifest is not installed and the marker says why."""
    path = node_config(tmp_path, trusted_keys=[public_key])
    proc = torchwarm("pull", "-c", str(path), env={"TORCHWARM_TRUSTED_KEYS": blank})
    assert not installed(tmp_path), proc.stdout
    doc = marker(tmp_path)
    assert doc["status"] == "cold" and "$TORCHWARM_TRUSTED_KEYS" in doc["reason"]


def test_blank_trusted_keys_variable_under_run_starts_the_app_cold(tmp_path, public_key):
    """`run` with a blank $TORCHWARM_TRUSTED_KEYS starts the app cold, nothing installed."""
    path = node_config(tmp_path, trusted_keys=[public_key])
    proc = torchwarm("run", "-c", str(path), *APP, env={"TORCHWARM_TRUSTED_KEYS": " "})
    assert "app started" in proc.stdout and not installed(tmp_path)
    assert "$TORCHWARM_TRUSTED_KEYS" in marker(tmp_path)["reason"]


# -- row 2: a config nested past any sane depth ----------------------------------------


@pytest.mark.parametrize("command", ["pull", "run"])
def test_deeply_nested_config_starts_cold(tmp_path, command):
    """500 nested YAML lists are a config error, not a RecursionError: exit 0, cold marker."""
    path = write_config(tmp_path, "[" * 500 + "]" * 500)
    where = tmp_path / "ready.json"
    args = [command, "-c", str(path), "--marker", str(where), *(APP if command == "run" else [])]
    proc = torchwarm(*args)
    assert command == "pull" or "app started" in proc.stdout
    doc = json.loads(where.read_text())
    assert doc["status"] == "cold" and "nested deeper than" in doc["reason"], doc["reason"]


# -- row 3: YAML aliases that expand to millions of nodes ------------------------------


def test_alias_expansion_config_is_refused_before_it_grows(tmp_path):
    """A 20 KB config whose aliases expand to millions of tensors is refused while it is
    read: within a 2 GiB address space the pull ends cold with a marker saying why."""
    text = "store: store\ncache_dir: node/inductor\ndeadline_s: 1\n"
    inputs = alias_bomb_inputs()  # 2400 aliases of a set of 2400 aliases of one tensor
    text += f"workloads: [{{name: mlp, model: 'torchwarm.models:mlp', inputs: {inputs}}}]\n"
    path = write_config(tmp_path, text)
    where = tmp_path / "ready.json"
    # The shared runner's command line, plus an address-space limit and a time bound.
    proc = subprocess.run(
        [*CLI, "pull", "-c", str(path), "--marker", str(where)], env=cli_env(),
        capture_output=True, text=True, timeout=60, preexec_fn=limit_address_space,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(where.read_text())
    assert doc["status"] == "cold" and "more than" in doc["reason"], doc["reason"]


@pytest.mark.parametrize(
    "extra, problem",
    [
        ("# " + "x" * (256 << 10) + "\n", "larger than 256 KiB"),
        ("model_kwargs: &k {inner: *k}", r"the alias \*k is inside the node it names"),
    ],
    ids=["over-256-KiB", "recursive-alias"],
)
def test_config_beyond_the_loader_bounds_is_refused(tmp_path, extra, problem):
    """A file over 256 KiB, or an alias inside the node it names, is a ConfigError."""
    path = minimal_config(tmp_path)
    if extra.startswith("model_kwargs"):  # the workload's own key
        path.write_text(path.read_text().replace("    inputs:", f"    {extra}\n    inputs:"))
    else:
        path.write_text(path.read_text() + extra)
    with pytest.raises(ConfigError, match=problem):
        config.load(path, environ={})


# -- row 8: numbers out of range -------------------------------------------------------


def test_huge_deadline_is_a_config_error_naming_the_bound(tmp_path):
    """deadline_s: 1e10 is refused at load, naming the key and its bound (exit 2)."""
    path = node_config(tmp_path, deadline_s=1e10)
    proc = torchwarm("pull", "-c", str(path), "--require", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "deadline_s is 10000000000.0; expected" in proc.stderr and "86400" in proc.stderr


@pytest.mark.parametrize(
    "extra, key",
    [
        ("deadline_s: .nan\n", "deadline_s"),
        ("warmup_timeout_s: 1.0e+300\n", "warmup_timeout_s"),
        ("deadline_s: " + "9" * 400 + "\n", "deadline_s"),
        ("daemon: {interval_s: .inf}\n", "daemon.interval_s"),
        ("store_options: {read_timeout_s: .nan}\n", "store_options.read_timeout_s"),
        ("store_options: {concurrency: 100000}\n", "store_options.concurrency"),
    ],
    ids=["nan", "huge-float", "400-digit-int", "inf", "store-nan", "store-huge"],
)
def test_out_of_range_numbers_name_their_key(tmp_path, extra, key):
    """A number that is not finite or is out of its documented range is a ConfigError
    naming its key path."""
    with pytest.raises(ConfigError, match=rf": {key} is .*expected"):
        config.load(minimal_config(tmp_path, extra), environ={})


def test_integer_past_pythons_digit_limit_is_a_config_error(tmp_path):
    """A 5000-digit integer (past int()'s digit limit) is a ConfigError, not a ValueError."""
    with pytest.raises(ConfigError, match="line 8"):
        config.load(minimal_config(tmp_path, "seed_of_doom: " + "9" * 5000 + "\n"), environ={})


# -- row 12: wait --timeout ------------------------------------------------------------


@pytest.mark.parametrize("timeout", ["nan", "inf", "-1"])
def test_wait_refuses_a_timeout_that_is_not_a_finite_number_of_seconds(tmp_path, timeout):
    """`wait --timeout nan|inf|-1` is a usage error: exit 2 at once, naming --timeout."""
    args = ["wait", "--marker", str(tmp_path / "ready.json"), f"--timeout={timeout}"]
    proc = torchwarm(*args, check=False, timeout=30)
    assert proc.returncode == 2 and "--timeout" in proc.stderr, proc.stderr


# -- every TORCHWARM_* variable: blank and malformed values ----------------------------


@pytest.mark.parametrize("var", [*config.ENV_VARS, config.SIGNING_KEY_VAR, "TORCHWARM_BOOT_ID"])
@pytest.mark.parametrize("value", [" ", "\t", "\n"], ids=["space", "tab", "newline"])
def test_every_variable_refuses_a_blank_value(tmp_path, var, value):
    """A blank TORCHWARM_* variable is a ConfigError naming it (an empty one is unset)."""
    with pytest.raises(ConfigError, match=rf"\${var}\b"):
        config.load(minimal_config(tmp_path), environ={var: value})


@pytest.mark.parametrize(
    "var, value",
    [
        ("TORCHWARM_REQUIRE", "true "),
        ("TORCHWARM_REQUIRE", "2"),
        ("TORCHWARM_DEADLINE_S", "nan"),
        ("TORCHWARM_DEADLINE_S", "1e10"),
        ("TORCHWARM_DEADLINE_S", " 30"),
        ("TORCHWARM_STORE", "ftp://host/x"),
        ("TORCHWARM_CACHE_DIR", "/var/cache/ inductor "),
        ("TORCHWARM_TRUSTED_KEYS", "seed-1"),
        ("TORCHWARM_FORMAT", "cachedir "),
    ],
)
def test_malformed_variable_is_a_config_error_naming_it(tmp_path, var, value):
    """A TORCHWARM_* value that does not parse as its type is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=rf"\${var}\b") as e:
        config.load(minimal_config(tmp_path), environ={var: value})
    assert "\n" not in str(e.value)


def test_malformed_require_variable_fails_closed(tmp_path):
    """TORCHWARM_REQUIRE='true ' asked for something: the pull fails closed (exit 2, one
    line naming the variable), installs nothing and writes no marker."""
    path = node_config(tmp_path)
    proc = torchwarm("pull", "-c", str(path), env={"TORCHWARM_REQUIRE": "true "}, check=False)
    assert proc.returncode == 2, proc.stdout
    assert "$TORCHWARM_REQUIRE" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not installed(tmp_path)


def test_blank_boot_id_is_a_config_error_for_pull_and_wait(tmp_path):
    """A blank $TORCHWARM_BOOT_ID (a boot id every boot would share): the pull starts cold
    saying so and writes no marker, and `wait` exits 2 naming the variable."""
    path, env = node_config(tmp_path), {"TORCHWARM_BOOT_ID": " "}
    ready = tmp_path / "node" / "torchwarm-ready.json"
    proc = torchwarm("pull", "-c", str(path), env=env)
    assert "$TORCHWARM_BOOT_ID" in proc.stdout and not installed(tmp_path)
    assert not ready.exists()
    waited = torchwarm("wait", "--marker", str(ready), "--timeout=0", env=env, check=False)
    assert waited.returncode == 2 and "$TORCHWARM_BOOT_ID" in waited.stderr, waited.stderr


# -- config.fallback never raises ------------------------------------------------------

# Eight levels of 50 aliases of the level below: 50**8 nodes once expanded.
BILLION_LAUGHS = "l0: &l0 [" + ",".join(["1"] * 50) + "]\n"
for level in range(1, 8):
    BILLION_LAUGHS += f"l{level}: &l{level} [{','.join([f'*l{level - 1}'] * 50)}]\n"


@pytest.mark.parametrize(
    "text",
    [
        "[" * 5000 + "]" * 5000,
        BILLION_LAUGHS,
        "cache_dir: " + "9" * 5000 + "\n",
        "cache_dir: !!binary AAAA\nmarker: 2001-12-14\n",
        "\udcff",
    ],
    ids=["deep", "alias-bomb", "huge-int", "odd-types", "not-utf8"],
)
def test_fallback_never_raises(tmp_path, text):
    """Whatever the file holds, config.fallback returns what it can (here: nothing)."""
    path = tmp_path / "c.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert config.fallback(path, environ={}) == config.Fallback(None, None, False)


def test_fallback_reads_a_malformed_require_as_required(tmp_path):
    """A require value that does not parse is read as `required` by the fallback."""
    path = minimal_config(tmp_path, "require: 'yes please'\n")
    assert config.fallback(path, environ={}).require is True
    assert config.fallback(None, environ={"TORCHWARM_REQUIRE": "true "}).require is True
