"""config.load: the shipped example, one-line errors naming file and key path, precedence."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from factories import minimal_config, write_config
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from torchwarm import config
from torchwarm.errors import ConfigError

# No explain phase: it re-runs a failing example hundreds of times (~20 s).
PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)
REPO = Path(__file__).resolve().parent.parent


def load_error(path: Path, **kwargs) -> str:
    """The message of the ConfigError that loading `path` raises, checked to be one line."""
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as e:
        config.load(path, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_example_config_parses():
    """The shipped configs/example.yaml loads into a Config with its one workload."""
    cfg = config.load(REPO / "configs" / "example.yaml", environ={})
    assert cfg.store.startswith("file:///")
    assert cfg.format == "cachedir"
    assert [w.name for w in cfg.workloads] == ["mlp"]
    assert cfg.workloads[0].inputs[0][0].dynamic == (0,)


def test_missing_store_names_file_and_key(tmp_path):
    """A config without `store` is a one-line error naming the file and the key."""
    path = write_config(tmp_path, "cache_dir: x\n")
    msg = load_error(path)
    assert msg.startswith(f"{path}: store is required")


def test_bad_dtype_names_its_key_path(tmp_path):
    """A bad dtype deep in a workload names its full key path and the allowed dtypes."""
    path = minimal_config(tmp_path)
    text = path.read_text().replace(
        "- [{shape: [4, 64]}]", "- [{shape: [4, 64]}]\n      - [{shape: [1, 64], dtype: f32}]"
    )
    path.write_text(text)
    msg = load_error(path)
    assert str(path) in msg
    assert "workloads[0].inputs[1][0].dtype" in msg
    assert "'f32'" in msg and "bfloat16" in msg


def test_unknown_key_lists_the_known_ones(tmp_path):
    """An unknown top-level key is named, with the list of known keys."""
    msg = load_error(minimal_config(tmp_path, "colour: blue\n"))
    assert "colour is not a known key" in msg
    listed = msg.split("expected one of: ")[1].split(", ")
    assert listed == sorted(listed)
    assert {"cache_dir", "format", "marker", "require", "store", "workloads"} <= set(listed)


def test_unknown_nested_key_names_its_path(tmp_path):
    """An unknown key inside a workload's compile options names its dotted path."""
    path = minimal_config(tmp_path)
    path.write_text(path.read_text() + "    compile: {backnd: inductor}\n")
    assert "workloads[0].compile.backnd is not a known key" in load_error(path)


def test_yaml_syntax_error_has_line_number(tmp_path):
    """A YAML syntax error names the file and the line it was found on."""
    path = write_config(tmp_path, "store: s\ncache_dir: c\nworkloads: [\n  {name: a\n")
    msg = load_error(path)
    assert msg.startswith(f"{path} at line ")
    assert "fix the YAML syntax" in msg


def test_duplicate_workload_names_refused(tmp_path):
    """Two workloads with one name are refused, naming the second one's key."""
    path = minimal_config(tmp_path)
    body = path.read_text().split("workloads:\n", 1)[1]
    path.write_text(path.read_text() + body)
    msg = load_error(path)
    assert "workloads[1].name duplicate workload name 'mlp'" in msg


def test_workload_name_with_trailing_newline_refused(tmp_path):
    """A workload name ending in a newline is not a valid name (it would end up in store keys)."""
    path = minimal_config(tmp_path)
    path.write_text(path.read_text().replace("name: mlp", 'name: "mlp\\n"'))
    assert "workloads[0].name must be" in load_error(path)


def test_inputs_not_a_list_refused(tmp_path):
    """`inputs` given as a string is refused, naming the key."""
    path = minimal_config(tmp_path)
    path.write_text(path.read_text().replace("inputs:\n      - [{shape: [4, 64]}]", "inputs: x"))
    assert "workloads[0].inputs must be a non-empty list" in load_error(path)


def test_top_level_not_a_mapping_refused(tmp_path):
    """A YAML list at the top level is a ConfigError, not a crash."""
    assert "top level must be a mapping" in load_error(write_config(tmp_path, "- a\n- b\n"))


def test_missing_file_is_config_error(tmp_path):
    """A config path that does not exist is a ConfigError naming it."""
    assert "cannot read the config file" in load_error(tmp_path / "nope.yaml")


def test_file_not_utf8_is_config_error(tmp_path):
    """A config file that is not UTF-8 text is a ConfigError, not a UnicodeDecodeError."""
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"store: \xff\xfe\n")
    assert str(path) in load_error(path)


def test_null_byte_in_path_is_config_error(tmp_path):
    """A cache_dir with a NUL character is a ConfigError naming the key, not a ValueError."""
    path = minimal_config(tmp_path)
    path.write_text(path.read_text().replace("cache_dir: node/inductor", 'cache_dir: "a\\0b"'))
    assert "cache_dir" in load_error(path)


def test_unknown_key_with_newline_is_one_line(tmp_path):
    """An unknown key holding a line break is quoted, so the error stays one line."""
    load_error(minimal_config(tmp_path, '"a\\nb": 1\n'))


def test_default_format_when_yaml_says_nothing(tmp_path):
    """Without a `format` key anywhere, the built-in default applies."""
    cfg = config.load(minimal_config(tmp_path), environ={})
    assert cfg.format == config.DEFAULT_FORMAT
    assert cfg.require is False


def test_yaml_beats_defaults(tmp_path):
    """A `format` in the YAML replaces the default."""
    cfg = config.load(minimal_config(tmp_path, "format: megacache\n"), environ={})
    assert cfg.format == "megacache"


def test_environment_beats_yaml(tmp_path):
    """TORCHWARM_FORMAT and TORCHWARM_REQUIRE replace the YAML values."""
    path = minimal_config(tmp_path, "format: megacache\nrequire: false\n")
    cfg = config.load(path, environ={"TORCHWARM_FORMAT": "cachedir", "TORCHWARM_REQUIRE": "yes"})
    assert (cfg.format, cfg.require) == ("cachedir", True)


def test_empty_environment_variable_is_ignored(tmp_path):
    """An empty TORCHWARM_FORMAT leaves the YAML value in place."""
    cfg = config.load(
        minimal_config(tmp_path, "format: megacache\n"), environ={"TORCHWARM_FORMAT": ""}
    )
    assert cfg.format == "megacache"


def test_overrides_beat_environment(tmp_path):
    """A flag override replaces the environment value; a None override changes nothing."""
    path = minimal_config(tmp_path, "format: cachedir\n")
    env = {"TORCHWARM_FORMAT": "megacache", "TORCHWARM_STORE": "file:///env"}
    cfg = config.load(path, overrides={"format": "cachedir", "store": None}, environ=env)
    assert cfg.format == "cachedir"
    assert cfg.store == "file:///env"


def test_bad_environment_value_is_config_error(tmp_path):
    """A TORCHWARM_REQUIRE that is not a boolean is a ConfigError naming `require`."""
    msg = load_error(minimal_config(tmp_path), environ={"TORCHWARM_REQUIRE": "maybe"})
    assert "require (from $TORCHWARM_REQUIRE) is 'maybe'" in msg


def test_relative_paths_resolve_against_config_folder(tmp_path, monkeypatch):
    """cache_dir and marker are relative to the config file's folder, not the cwd."""
    folder = tmp_path / "etc"
    path = minimal_config(folder, "marker: run/ready.json\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = config.load(Path("..") / "etc" / path.name, environ={})
    assert cfg.cache_dir == (folder / "node" / "inductor").resolve()
    assert cfg.marker_path == (folder / "run" / "ready.json").resolve()


def test_default_marker_beside_cache_dir(tmp_path):
    """Without `marker`, the ready marker lives in the cache dir's parent."""
    cfg = config.load(minimal_config(tmp_path), environ={})
    assert cfg.marker_path == cfg.cache_dir.parent / "torchwarm-ready.json"


def test_bare_store_path_becomes_file_url(tmp_path):
    """A store given as a relative path becomes a file:// URL under the config's folder."""
    cfg = config.load(minimal_config(tmp_path, store="../shared/store"), environ={})
    assert cfg.store == (tmp_path.parent / "shared" / "store").resolve().as_uri()


def test_store_url_kept_as_is(tmp_path):
    """A store given as a URL is not rewritten."""
    cfg = config.load(minimal_config(tmp_path, store="s3://bucket/prefix"), environ={})
    assert cfg.store == "s3://bucket/prefix"


def test_unknown_workload_lists_known(tmp_path):
    """Config.workload on an unknown name says which names exist."""
    cfg = config.load(minimal_config(tmp_path), environ={})
    with pytest.raises(ConfigError, match="no workload named 'x'; known: mlp"):
        cfg.workload("x")


def test_warmup_timeout_default_top_level_and_per_workload(tmp_path):
    """A workload's warm-up timeout is its own warmup_timeout_s, else the top-level one,
    else an hour."""
    assert config.load(minimal_config(tmp_path), environ={}).workloads[0].warmup_timeout_s == 3600
    cfg = config.load(minimal_config(tmp_path, "warmup_timeout_s: 900\n"), environ={})
    assert cfg.warmup_timeout_s == 900 and cfg.workloads[0].warmup_timeout_s == 900
    path = minimal_config(tmp_path, "warmup_timeout_s: 900\n")
    path.write_text(
        path.read_text().replace("    inputs:", "    warmup_timeout_s: 60\n    inputs:")
    )
    assert config.load(path, environ={}).workloads[0].warmup_timeout_s == 60


@pytest.mark.parametrize(
    "extra, key",
    [
        ("warmup_timeout_s: 0\n", "warmup_timeout_s is 0"),
        ("daemon: {refresh_s: -1}\n", "daemon.refresh_s is -1"),
    ],
)
def test_bad_timeouts_name_their_key(tmp_path, extra, key):
    """A timeout or period that is not a positive number of seconds names its key path."""
    msg = load_error(minimal_config(tmp_path, extra))
    assert key in msg and "expected a positive number of seconds" in msg


def test_bad_workload_timeout_names_its_key_path(tmp_path):
    """A workload's own warmup_timeout_s is checked and named by its path."""
    path = minimal_config(tmp_path)
    path.write_text(
        path.read_text().replace("    inputs:", "    warmup_timeout_s: soon\n    inputs:")
    )
    assert "workloads[0].warmup_timeout_s is 'soon'" in load_error(path)


def test_warmup_key_ignores_the_timeout(tmp_path):
    """Changing how long a warm-up may take does not make the daemon warm it up again."""
    from dataclasses import replace

    from torchwarm.seed.warmup import warmup_key

    w = config.load(minimal_config(tmp_path), environ={}).workloads[0]
    longer = replace(w, warmup_timeout_s=7200)
    assert warmup_key(w, "cachedir", "0" * 32) == warmup_key(longer, "cachedir", "0" * 32)
    assert warmup_key(w, "cachedir", "0" * 32) != warmup_key(
        replace(w, seed=1), "cachedir", "0" * 32
    )


def test_warmup_key_follows_the_model_package(tmp_path, monkeypatch):
    """An edit in a module the factory's module imports (a constant in a sibling) makes
    the daemon warm up again; a package that cannot be found is one ConfigError line."""
    from dataclasses import replace

    from torchwarm.errors import ConfigError
    from torchwarm.seed.warmup import warmup_key

    pkg = tmp_path / "keypkg_models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "factory.py").write_text("from .layers import SCALE\n\ndef build():\n    ...\n")
    (pkg / "layers.py").write_text("SCALE = 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    w = config.load(minimal_config(tmp_path), environ={}).workloads[0]
    w = replace(w, model="keypkg_models.factory:build")
    before = warmup_key(w, "cachedir", "0" * 32)
    assert warmup_key(w, "cachedir", "0" * 32) == before
    (pkg / "layers.py").write_text("SCALE = 2.0\n")
    assert warmup_key(w, "cachedir", "0" * 32) != before
    with pytest.raises(ConfigError, match="'keypkg_nowhere' is not on this Python's path"):
        warmup_key(replace(w, model="keypkg_nowhere.m:build"), "cachedir", "0" * 32)


# A model module whose bytes never change, so that a warm-up key over it is a constant.
KEY_MODEL = (
    '"""A model module whose bytes are fixed, for a key test."""\n\n\n'
    "def build(d: int = 8):\n    import torch\n\n    return torch.nn.Linear(d, d)\n"
)
KEY_WORKLOADS = {
    "plain": """
        name: lin
        model: twkey_model:build
        model_kwargs: {d: 8}
        inputs:
          - [{shape: [4, 8], dtype: float32, dynamic: [0]}]
          - [{shape: [1, 8]}]
        """,
    "train": """
        name: lin-train
        model: twkey_model:build
        mode: train
        seed: 3
        warmup_timeout_s: 99
        compile: {mode: max-autotune-no-cudagraphs, fullgraph: true, dynamic: false}
        inputs:
          - {shape: [2, 8], dtype: float32}
          - [{shape: [2, 8], dtype: int64, high: 5}]
        """,
}


def _key_workload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str) -> config.Workload:
    import textwrap

    (tmp_path / "twkey_model.py").write_text(KEY_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    return config.parse_workload(yaml.safe_load(textwrap.dedent(KEY_WORKLOADS[which])), "t")


@pytest.mark.parametrize(
    "which, fmt, fingerprint, env, key",
    [
        ("plain", "cachedir", "0" * 64, None,
         "52b8fd5eb18da32f82554d01cf93ba7e3d00bbec7868d563e82a1ad095fe9466"),
        ("plain", "megacache", "1" * 64, {"OMP_PROC_BIND": "1"},
         "8b34d56176a405643d4952e338567db9f070016a878b50cae2d23c019d96e5e5"),
        ("train", "cachedir", "0" * 64, None,
         "5ff82e78f7a640a85b7bfe996c57d0060b3baf4bff9ab4494170917fb1396f3a"),
        ("train", "megacache", "1" * 64, {"OMP_PROC_BIND": "1"},
         "0f418e53fc1c0a63f990b19c67fc48caf425d8cb945edff46f4a81d6199f659f"),
    ],
    ids=["plain", "plain-megacache-env", "train", "train-megacache-env"],
)  # fmt: skip
def test_warmup_key_of_a_workload_without_the_new_keys_is_unchanged(
    tmp_path, monkeypatch, which, fmt, fingerprint, env, key
):
    """A model workload that sets none of kwargs, method, compile.target, fill and
    at_node_path keeps the warm-up key it had before they existed (computed on 495aef0),
    so a seed upgrade warms nothing again."""
    from torchwarm.seed.warmup import warmup_key

    w = _key_workload(tmp_path, monkeypatch, which)
    assert warmup_key(w, fmt, fingerprint, env) == key


@pytest.mark.parametrize(
    "change",
    [
        {"method": "generate", "compile": config.CompileOptions(target="forward")},
        {"compile": config.CompileOptions(target="forward")},
        {"kwargs": ({"max_new_tokens": 4},)},
        {"kwargs": ({"mask": config.TensorSpec((4, 8), "int64")},)},
        {"at_node_path": True},
    ],
)
def test_warmup_key_follows_each_new_model_key(tmp_path, monkeypatch, change):
    """Setting a method, a compile target, keyword inputs or at_node_path changes the key."""
    from dataclasses import replace

    from torchwarm.seed.warmup import warmup_key

    w = _key_workload(tmp_path, monkeypatch, "plain")
    assert warmup_key(replace(w, **change), "cachedir", "0" * 64) != warmup_key(
        w, "cachedir", "0" * 64
    )


def test_warmup_key_follows_a_tensor_fill(tmp_path, monkeypatch):
    """A filled tensor (every element one value) is another warm-up than a random one."""
    from dataclasses import replace

    from torchwarm.seed.warmup import warmup_key

    w = _key_workload(tmp_path, monkeypatch, "plain")
    filled = replace(w, inputs=((replace(w.inputs[0][0], fill=1.0),), w.inputs[1]))
    assert warmup_key(filled, "cachedir", "0" * 64) != warmup_key(w, "cachedir", "0" * 64)


def test_hf_llama_example_parses():
    """The shipped configs/hf-llama.yaml loads: keyword inputs with a filled mask, and
    generate through a compiled forward with its constants."""
    cfg = config.load(REPO / "configs" / "hf-llama.yaml", environ={})
    forward, generate = cfg.workloads
    assert forward.inputs == ((),) and forward.compile.target == "module"
    assert forward.call_kwargs(0)["attention_mask"].fill == 1
    assert generate.method == "generate" and generate.compile.target == "forward"
    assert generate.call_kwargs(0)["max_new_tokens"] == 4
    assert generate.call_kwargs(0)["do_sample"] is False


@pytest.mark.parametrize("text, seconds", [("30d", 2592000), ("12h", 43200), ("90m", 5400),
                                           ("3600s", 3600), ("1.5h", 5400), ("0", 0)])  # fmt: skip
def test_durations(text, seconds):
    """Durations as gc --older-than takes them."""
    assert config.parse_duration(text, "--older-than") == seconds


@pytest.mark.parametrize("text", ["", "3x", "-1d", "d", "1 d 2h"])
def test_bad_duration_names_the_flag(text):
    """Anything else is a ConfigError naming the flag and the accepted forms."""
    with pytest.raises(ConfigError, match=f"--older-than {text!r}: expected a duration"):
        config.parse_duration(text, "--older-than")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("property")


# Values YAML can represent; keys biased towards the ones config.py knows.
_KEYS = st.sampled_from(
    ["store", "cache_dir", "format", "marker", "require", "workloads", "name", "model",
     "inputs", "shape", "dtype", "dynamic", "high", "compile", "mode", "seed", "device",
     "model_kwargs", "backend", "fullgraph"]
) | st.text(max_size=8)  # fmt: skip
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-5, 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.sampled_from(
        ["cpu", "float32", "torchwarm.models:mlp", "mlp", "file:///tmp/s", "a/b", "a\x00b"]
    )
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=5),
    max_leaves=25,
)
_WORKLOAD = st.fixed_dictionaries(
    {"name": st.text(max_size=6), "model": _SCALARS, "inputs": _VALUES},
    optional={"compile": _VALUES, "device": _SCALARS, "seed": _SCALARS, "mode": _SCALARS},
)
_CONFIGS = st.dictionaries(_KEYS, _VALUES, max_size=7) | st.fixed_dictionaries(
    {"store": _SCALARS, "cache_dir": _SCALARS, "workloads": st.lists(_WORKLOAD, max_size=2)},
    optional={"format": _SCALARS, "marker": _SCALARS, "require": _SCALARS},
)


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    phases=PHASES,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(doc=_CONFIGS)
@example(doc={"store": "a\x00b", "cache_dir": "c"})  # found by this test; see the NUL test
def test_any_yaml_mapping_gives_config_or_config_error(scratch, doc):
    """Whatever mapping the YAML holds, load returns a Config or raises ConfigError only."""
    path = scratch / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        result = config.load(path, environ={})
    except ConfigError:
        return
    assert isinstance(result, config.Config)


def test_a_plain_function_is_the_workload_itself():
    """`model: torchwarm.models:gelu_tanh` (a function of the inputs, no kwargs) is compiled
    as it is; a factory (no required arguments) is called to make the module."""
    from torchwarm import models
    from torchwarm.seed import child as workload

    fn = config.Workload("g", "torchwarm.models:gelu_tanh", ((config.TensorSpec((2, 4)),),))
    assert workload.build(fn) is models.gelu_tanh
    mlp = config.Workload("m", "torchwarm.models:mlp", ((config.TensorSpec((2, 64)),),))
    assert type(workload.build(mlp)).__name__ == "Sequential"


# -- a command workload's server block ----------------------------------------------------


def server_config(tmp_path: Path, block: object, **workload: object) -> Path:
    """A config with one command workload whose server block is `block`."""
    w = {"name": "api", "command": ["python", "server_app.py"], "server": block, **workload}
    doc = {"store": "store", "cache_dir": "node/inductor", "workloads": [w]}
    return write_config(tmp_path, yaml.safe_dump(doc))


def test_server_block_parses_with_its_defaults(tmp_path):
    """The README's server block gives a Server with its requests and stop; a block with
    only port and ready gets the documented defaults."""
    block = {"port": 8123, "ready": {"http": "/healthz"}, "ready_timeout_s": 120,
             "requests": [{"method": "POST", "path": "/predict",
                           "json": {"input_ids": [[1, 2, 3]]}, "repeat": 2, "status": 200},
                          {"path": "/info?verbose=1"}],
             "request_timeout_s": 30, "stop": {"signal": "SIGINT", "grace_s": 10}}  # fmt: skip
    (w,) = config.load(server_config(tmp_path, block), environ={}).workloads
    assert w.command is not None and w.command.server == config.Server(
        port=8123, ready="http", ready_target="/healthz", ready_timeout_s=120.0,
        requests=(config.WarmRequest("POST", "/predict", {"input_ids": [[1, 2, 3]]}, 2, 200),
                  config.WarmRequest("GET", "/info?verbose=1", None, 1, 200)),
        request_timeout_s=30.0, stop_signal="SIGINT", stop_grace_s=10.0,
    )  # fmt: skip
    block = {"port": 1, "ready": {"tcp": True}}
    (w,) = config.load(server_config(tmp_path, block), environ={}).workloads
    assert w.command is not None and w.command.server == config.Server(
        port=1, ready="tcp", ready_target="", ready_timeout_s=600.0, requests=(),
        request_timeout_s=600.0, stop_signal="SIGTERM", stop_grace_s=30.0,
    )  # fmt: skip


H = {"port": 8123, "ready": {"http": "/healthz"}}  # a valid block to break one key of


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ("8123", "server must be a mapping like {port: 8000, ready: {http: /healthz}}, got a str"),
        ({"ready": {"tcp": True}}, "server.port must be the TCP port it listens on at 127.0.0.1"),
        ({**H, "port": 70000}, "server.port must be the TCP port it listens on at 127.0.0.1"),
        ({**H, "port": "8123"}, "server.port must be the TCP port"),
        ({**H, "ready": {}}, "server.ready must be one check: {http: /healthz} (GET until 2xx)"),
        ({**H, "ready": {"http": "/a", "tcp": True}}, "server.ready must be one check"),
        ({**H, "ready": {"http": "healthz"}}, "server.ready.http must be a path starting with '/'"),
        ({**H, "ready": {"tcp": 8123}}, "server.ready.tcp must be true (the port is server.port)"),
        ({**H, "ready": {"log": "(unclosed"}}, "server.ready.log is not a regular expression"),
        ({**H, "ready": {"log": ""}}, "server.ready.log must be a regular expression"),
        ({**H, "ready_timeout_s": 0},
         "server.ready_timeout_s is 0; expected a positive number of seconds"),
        ({**H, "request_timeout_s": "soon"},
         "server.request_timeout_s is 'soon'; expected a positive number of seconds"),
        ({**H, "requests": {"path": "/p"}}, "server.requests must be a list of requests, got a"),
        ({**H, "requests": ["/p"]}, "server.requests[0] must be a mapping like {method: POST"),
        ({**H, "requests": [{"method": "FETCH"}]},
         "server.requests[0].method is 'FETCH'; expected one of: GET, POST, PUT, PATCH, DELETE"),
        ({**H, "requests": [{"path": "http://elsewhere/x"}]},
         "server.requests[0].path must be a path starting with '/'"),
        ({**H, "requests": [{"path": "/a b"}]}, "server.requests[0].path must be a path"),
        ({**H, "requests": [{"json": float("nan")}]},
         "server.requests[0].json cannot be sent as JSON"),
        ({**H, "requests": [{"repeat": 0}]},
         "server.requests[0].repeat must be a positive integer"),
        ({**H, "requests": [{"status": 700}]},
         "server.requests[0].status must be an HTTP status code (100-599)"),
        ({**H, "requests": [{"repeat": 600}, {"repeat": 401}]},
         "server.requests sends more than 1000 requests, repeats counted"),
        ({**H, "requests": [{"body": "x"}]}, "server.requests[0].body is not a known key"),
        ({**H, "stop": {"signal": "SIGSTOP"}},
         "server.stop.signal is 'SIGSTOP'; expected one of: SIGTERM, SIGINT, SIGQUIT"),
        ({**H, "stop": {"grace_s": -1}},
         "server.stop.grace_s is -1; expected a positive number of seconds"),
        ({**H, "stop": "SIGTERM"},
         "server.stop must be a mapping like {signal: SIGTERM, grace_s: 30}, got a str"),
        ({**H, "stop": {"after": 3}}, "server.stop.after is not a known key"),
        ({**H, "host": "0.0.0.0"}, "server.host is not a known key"),
    ],
)  # fmt: skip
def test_server_block_errors_name_the_key(tmp_path, block, expected):
    """Each mistake in a server block is one line naming the file and its key path."""
    path = server_config(tmp_path, block)
    msg = load_error(path)
    assert msg.startswith(f"{path}: workloads[0].") and expected in msg, msg


def test_server_block_on_a_model_workload_is_refused(tmp_path):
    """server belongs to command workloads: on a model workload it is a one-line error."""
    path = minimal_config(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["workloads"][0]["server"] = {"port": 8000, "ready": {"tcp": True}}
    path.write_text(yaml.safe_dump(doc))
    assert "workloads[0].server applies to command workloads only" in load_error(path)


@pytest.mark.parametrize(
    "block",
    [
        {**H, "ready": {"http": "/health/é"}},
        {**H, "requests": [{"path": "/q?text=héllo"}]},
    ],
    ids=["ready", "request"],
)
def test_server_paths_must_be_ascii(tmp_path, block):
    """A non-ASCII request path (http.client cannot send it) is refused at load, saying to
    percent-encode it."""
    msg = load_error(server_config(tmp_path, block))
    assert "must be a path starting with '/' in printable ASCII" in msg, msg
    assert "percent-encode" in msg, msg
