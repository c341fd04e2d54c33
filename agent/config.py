"""The one typed settings object, built from YAML, then TORCHWARM_* environment, then flags.

Precedence (later wins): built-in defaults < YAML file < environment < command-line flags.
Every environment variable torchwarm reads is read here (torch's own TORCHINDUCTOR_*
variables are read by fingerprint.py, because they are facts about the machine, not settings).
Validation errors name the file and the key path, and say what was expected.
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NoReturn

import yaml

from torchwarm.env.torchenv import PLACEHOLDER
from torchwarm.errors import ConfigError
from torchwarm.spec import signing
from torchwarm.spec.signing import SigningKey, TrustedKeys
from torchwarm.stores import SCHEMES, Store, StoreOptions, open_store

FORMATS = ("cachedir", "megacache", "precompile")
DEFAULT_FORMAT = "cachedir"  # measured faster on the node; see README "Measured"
DEFAULT_DEADLINE_S = 300.0  # a node never waits longer than this on a sick store
# A warm-up child still running after this is killed (with its children): a hung compile
# must fail the warm-up, not hold the seed forever. An hour fits real models on one GPU.
DEFAULT_WARMUP_TIMEOUT_S = 3600.0
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")
MODES = ("inference", "train")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Keys that only a model workload (a factory torchwarm calls) or only a command
# workload (a process of the user's) has.
MODEL_KEYS = ("model", "model_kwargs", "inputs", "method", "device", "mode", "compile", "seed")
COMMAND_KEYS = ("command", "cwd", "env", "code", "server")
COMPILE_TARGETS = ("module", "forward")  # what the app hands torch.compile (CompileOptions)
READY_CHECKS = ("http", "tcp", "log")  # how a server workload says it is ready (Server)
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGKILL")
DEFAULT_READY_TIMEOUT_S = 600.0  # a server that loads a model may take minutes to listen
DEFAULT_STOP_GRACE_S = 30.0
MAX_REQUESTS = 1000  # warm-up requests of one server workload, repeats counted
_METHOD = re.compile(r"^(__call__|[A-Za-z][A-Za-z0-9_]{0,63})$")
# What a config file may make the loader do (#20). A real config is a few KB and a few
# hundred YAML nodes; these bounds are far above that and far below a stall.
MAX_CONFIG_BYTES = 256 << 10
MAX_YAML_DEPTH = 32  # mappings and lists inside each other
MAX_YAML_NODES = 10_000  # counted expanded: an alias counts every node it stands for
# Upper bounds of durations in seconds, by key name (README, "Config"). Past them a value
# is a typo; far past them it overflows the clocks it is added to.
MAX_SECONDS = {
    "deadline_s": 86400.0,  # a day
    "warmup_timeout_s": 7 * 86400.0,
    "interval_s": 30 * 86400.0,
    "backoff_max_s": 30 * 86400.0,
    "refresh_s": 365 * 86400.0,
    "ready_timeout_s": 7 * 86400.0,
    "request_timeout_s": 7 * 86400.0,
    "grace_s": 86400.0,
    "quiet_s": 86400.0,
}
# The numeric store options: (lowest, highest); floats must be above their lowest.
STORE_RANGES: dict[str, tuple[float, float]] = {
    "connect_timeout_s": (0, 3600.0),
    "read_timeout_s": (0, 3600.0),
    "deadline_s": (0, 86400.0),
    "attempts": (1, 100),
    "chunk_size": (1, 5 << 30),  # S3's largest part
    "download_chunk_size": (1, 5 << 30),
    "multipart_threshold": (0, 5 << 40),  # S3's largest object
    "concurrency": (1, 256),
}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str = "float32"
    dynamic: tuple[int, ...] = ()  # dims passed to torch._dynamo.mark_dynamic
    high: int = 2  # exclusive upper bound of random integers (int dtypes only)
    fill: float | None = None  # every element this value (an attention mask of ones)


# A keyword input that is not a tensor: passed as written (max_new_tokens: 4, use_cache: false).
Constant = None | bool | int | float | str


@dataclass(frozen=True)
class CompileOptions:
    backend: str = "inductor"
    mode: str | None = None
    fullgraph: bool = False
    dynamic: bool | None = None
    # How the app compiles, which decides the cache keys: "module" is torch.compile(model),
    # "forward" is model.forward = torch.compile(model.forward) (what a call of
    # model.generate() goes through). Not an argument of torch.compile.
    target: str = "module"

    def as_kwargs(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "mode": self.mode,
            "fullgraph": self.fullgraph,
            "dynamic": self.dynamic,
        }


@dataclass(frozen=True)
class WarmRequest:
    """One HTTP request a server workload's warm-up sends to 127.0.0.1:port."""

    method: str = "GET"
    path: str = "/"  # with its query, from the first "/"
    json: Any = None  # the body, sent as application/json; None: no body
    repeat: int = 1
    status: int = 200  # the status it must answer with


@dataclass(frozen=True)
class Server:
    """What makes a command workload a server's: torchwarm waits until it is ready,
    sends its warm-up requests, stops it, then captures (seed/server.py)."""

    port: int  # it listens on 127.0.0.1:port; requests and checks go there only
    ready: str  # one of READY_CHECKS
    ready_target: str  # http: the path to GET until 2xx; log: a regex; tcp: ""
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    requests: tuple[WarmRequest, ...] = ()
    request_timeout_s: float = DEFAULT_READY_TIMEOUT_S  # each request's
    stop_signal: str = "SIGTERM"
    stop_grace_s: float = DEFAULT_STOP_GRACE_S  # then the whole process group is killed


@dataclass(frozen=True)
class Command:
    """A workload that is a process of the user's own (a warm-up script, a server start
    plus a warm request): torchwarm runs it, it compiles whatever it compiles."""

    argv: tuple[str, ...]  # run as is: no shell
    cwd: Path  # absolute; from the YAML, relative to the config file's folder
    env: Mapping[str, str] = field(default_factory=dict)  # for the warm-up only, unexpanded
    code: tuple[Path, ...] = ()  # files and folders whose content is hashed into the key
    server: Server | None = None  # set: a server, warmed by requests (seed/server.py)


@dataclass(frozen=True)
class Workload:
    name: str
    model: str | None  # "package.module:callable" (an nn.Module or a function); None: command
    inputs: tuple[tuple[TensorSpec, ...], ...]  # one tuple of tensors per input set
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    mode: str = "inference"  # or "train": forward + backward
    compile: CompileOptions = CompileOptions()
    seed: int = 0
    # Not part of what is compiled: warmup.warmup_key leaves it out.
    warmup_timeout_s: float = DEFAULT_WARMUP_TIMEOUT_S
    command: Command | None = None  # set instead of model (then model is None, inputs ())
    # Which of the two it is, and all that follows from it: torchwarm.seed.kinds.of(w).
    # Keyword inputs, one mapping per input set (() when none has any): tensors by spec,
    # other values as written.
    kwargs: tuple[Mapping[str, TensorSpec | Constant], ...] = ()
    method: str = "__call__"  # what is called on the model, e.g. generate
    # Warm up with the cache at the config's cache_dir, the node's own path, instead of a
    # fresh folder: a cache that records its absolute root hits on the node only then.
    # Default: on for command workloads, off for model workloads (parse).
    at_node_path: bool = False

    def call_kwargs(self, i: int) -> Mapping[str, TensorSpec | Constant]:
        """The keyword inputs of input set `i`."""
        return self.kwargs[i] if self.kwargs else {}


@dataclass(frozen=True)
class DaemonOptions:
    interval_s: float = 3600.0  # between passes; each wait is jittered by ±jitter
    jitter: float = 0.1
    listen: str | None = None  # HOST:PORT for /metrics and /healthz; None: no HTTP
    backoff_max_s: float = 3600.0  # a failing workload is retried after 60 s, doubling to this
    # A skipped workload's manifest older than this is touched, so that gc's --older-than
    # (default 30 days) never takes an environment a seed still serves for dead.
    refresh_s: float = 7 * 86400.0


# Node publishes (torchwarm.node.selfseed): off; cold, for workloads that started cold
# for want of a manifest; misses, also adding the app's new entries to a node-published one.
PUBLISH_MODES = ("off", "cold", "misses")
DEFAULT_QUIET_S = 60.0
DEFAULT_PUBLISH_MAX_BYTES = 8 << 30
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class PublishOptions:
    """When a node publishes the app's own cache dir (README "The fleet seeds itself")."""

    mode: str = "off"  # one of PUBLISH_MODES; `run --publish` / `serve --publish`: cold
    ready_url: str | None = None  # the app's readiness URL: http, on a loopback host only
    quiet_s: float = DEFAULT_QUIET_S  # ready, and no new compile entry for this long
    max_bytes: int = DEFAULT_PUBLISH_MAX_BYTES  # a larger capture is not published

    @property
    def on(self) -> bool:
        return self.mode != "off"


@dataclass(frozen=True)
class Config:
    store: str
    cache_dir: Path
    format: str = DEFAULT_FORMAT
    marker: Path | None = None  # default: <cache_dir's parent>/torchwarm-ready.json
    require: bool = False
    deadline_s: float = DEFAULT_DEADLINE_S
    workloads: tuple[Workload, ...] = ()
    source: str = "<defaults>"
    store_options: StoreOptions = StoreOptions()
    daemon: DaemonOptions = DaemonOptions()
    signing_key: SigningKey | None = field(default=None, repr=False)  # seeds sign with it
    trusted_keys: TrustedKeys = TrustedKeys({})  # nodes accept only manifests they signed
    warmup_timeout_s: float = DEFAULT_WARMUP_TIMEOUT_S  # for workloads that set none
    # Extra environment for every warm-up and for the app under `torchwarm run`, values
    # unexpanded ({cache_dir}: torchenv.expand): where other compile caches go.
    env: Mapping[str, str] = field(default_factory=dict)
    publish: PublishOptions = PublishOptions()
    node_key: SigningKey | None = field(default=None, repr=False)  # nodes sign their publishes
    # Keys of node publishes this node accepts: never one of trusted_keys (the seed's).
    trusted_node_keys: TrustedKeys = TrustedKeys({})

    def open_store(self, read_only: bool = False) -> Store:
        return open_store(self.store, self.store_options, read_only=read_only)

    @property
    def marker_path(self) -> Path:
        return self.marker or self.cache_dir.parent / "torchwarm-ready.json"

    def workload(self, name: str) -> Workload:
        for w in self.workloads:
            if w.name == name:
                return w
        known = ", ".join(w.name for w in self.workloads) or "(none)"
        raise ConfigError(f"{self.source}: no workload named {name!r}; known: {known}")

    def selected(self, name: str | None) -> tuple[Workload, ...]:
        """The workload `name`, or all of them when `name` is None."""
        if name is not None:
            return (self.workload(name),)
        if not self.workloads:
            raise ConfigError(f"{self.source}: 'workloads' is empty; add at least one workload")
        return self.workloads


# -- the environment ------------------------------------------------------------------
# One parser per kind of value. Each takes a variable's text (never empty: an empty
# variable is unset, as Kubernetes' `value: ""` is) and returns the value for its field,
# or raises ValueError with what was expected; load() names the variable in the error.
# A blank value is refused everywhere: `" ".split()` once turned TORCHWARM_TRUSTED_KEYS
# into an empty list, which switched signature checks off (#20).
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _env_text(text: str) -> str:
    """Any value: not blank, no whitespace around it (a stray space or newline must not
    change what it means), no NUL."""
    if not text.strip():
        raise ValueError("expected a value; unset the variable to use the file's or the default")
    if text != text.strip():
        raise ValueError("expected no whitespace around the value")
    if "\0" in text:
        raise ValueError("expected no NUL character")
    return text


def _env_bool(text: str) -> bool:
    word = _env_text(text).lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(f"expected true or false ({', '.join(_TRUE)} / {', '.join(_FALSE)})")


def _env_number(text: str) -> float:
    """A number; its range is the key's, checked with the file's values (_Validator)."""
    text = _env_text(text)
    try:
        return float(text)
    except ValueError:
        raise ValueError("expected a number") from None


def _env_keys(text: str) -> list[str]:
    """Public keys separated by spaces or commas (each is parsed by signing.load_trusted).
    Surrounding whitespace is a separator here, but at least one key must be left."""
    keys = text.replace(",", " ").split()
    if not keys:
        raise ValueError("expected public keys like 'seed-1:base64…', separated by spaces")
    return keys


# Environment variables, in one table: name -> (Config field, parser of its text). What
# a value means past its parser is checked with the file's values, in one place: a URL's
# scheme (_store_url), a path (_path, relative to the working directory: _from_cwd), a
# format (FORMATS), a number's range (MAX_SECONDS), each key (signing.load_trusted).
ENV_VARS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "TORCHWARM_STORE": ("store", _env_text),
    "TORCHWARM_CACHE_DIR": ("cache_dir", _env_text),
    "TORCHWARM_FORMAT": ("format", _env_text),
    "TORCHWARM_MARKER": ("marker", _env_text),
    "TORCHWARM_REQUIRE": ("require", _env_bool),
    "TORCHWARM_DEADLINE_S": ("deadline_s", _env_number),
    "TORCHWARM_SIGNING_KEY_FILE": ("signing_key_file", _env_text),
    "TORCHWARM_TRUSTED_KEYS": ("trusted_keys", _env_keys),
    "TORCHWARM_NODE_KEY_FILE": ("node_key_file", _env_text),
    "TORCHWARM_TRUSTED_NODE_KEYS": ("trusted_node_keys", _env_keys),
}
# The secret key itself may come from the environment (a Kubernetes Secret as env),
# never from the YAML file.
SIGNING_KEY_VAR = "TORCHWARM_SIGNING_KEY"
NODE_KEY_VAR = "TORCHWARM_NODE_KEY"  # the node key's secret text, for node publishes
# What the app under `torchwarm run` never inherits: the keys that sign manifests.
SECRET_VARS = (SIGNING_KEY_VAR, NODE_KEY_VAR, "TORCHWARM_SIGNING_KEY_FILE",
               "TORCHWARM_NODE_KEY_FILE")  # fmt: skip
# The ready marker's boot identity (torchwarm.node.marker), read by pull and wait alike.
BOOT_ID_VAR = "TORCHWARM_BOOT_ID"


def boot_id_variable(environ: Mapping[str, str] | None = None) -> str | None:
    """$TORCHWARM_BOOT_ID, None when unset or empty; ConfigError when blank or padded."""
    text = (os.environ if environ is None else environ).get(BOOT_ID_VAR, "")
    if text == "":
        return None
    try:
        return _env_text(text)
    except ValueError as e:
        raise ConfigError(f"${BOOT_ID_VAR} is {_short(text)}; {e}") from None


# -- the file -------------------------------------------------------------------------


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses, with the line where it happens, a document nested
    deeper than MAX_YAML_DEPTH (PyYAML composes recursively: 500 nested lists were a
    RecursionError), one of more than MAX_YAML_NODES nodes once aliases are expanded (the
    validator walks them expanded: a 45 KB file of aliases of aliases took 47 s and
    1.5 GiB), an alias inside the node it names, and a scalar its constructor cannot read
    (an integer past int()'s digit limit, a date such as 2001-13-45). Nodes are counted
    as they are read, so a refused file costs at most MAX_YAML_NODES nodes of parsing."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0  # read so far, expanded
        self._weight: dict[int, int] = {}  # id(node) -> nodes it stands for, expanded

    def _count(self, n: int, mark: Any) -> None:
        self._nodes += n
        if self._nodes > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(
                None, None,
                f"the document expands to more than {MAX_YAML_NODES} YAML nodes (an alias "
                "counts as the nodes it stands for)", mark,
            )  # fmt: skip

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)  # None: PyYAML says "undefined alias"
            if target is not None:
                if id(target) not in self._weight:
                    raise yaml.composer.ComposerError(
                        None, None, f"the alias *{event.anchor} is inside the node it names",
                        event.start_mark,
                    )  # fmt: skip
                self._count(self._weight[id(target)], event.start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark
            )
        before = self._nodes
        self._count(1, event.start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._weight[id(node)] = self._nodes - before
        return node

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as e:
            kind = node.tag.rpartition(":")[2]
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this {kind}: {str(e).split(';')[0]}", node.start_mark
            ) from None


def _read_yaml(p: Path) -> Any:
    """The YAML document in file `p`, within the bounds above; ConfigError otherwise."""
    try:
        with p.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{p}: is larger than {MAX_CONFIG_BYTES >> 10} KiB; a config is a few KB: is this "
            "the right file?"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: is not UTF-8 text; save the config as UTF-8") from None
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{p}{where}: {problem}; fix the YAML syntax") from None


def load(
    path: str | Path | None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the Config: YAML at `path` (optional), then environment, then `overrides` (flags)."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    source = "<defaults>"
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        source = str(p)
        base = p.resolve().parent
        loaded = _read_yaml(p)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping, got {_kind(loaded)}")
        raw = loaded
    origins: dict[str, str] = {}
    v = _Validator(source, origins)
    for var, (key, parse) in ENV_VARS.items():
        text = environ.get(var, "")
        if text == "":
            continue
        origins[key] = f"{key} (from ${var})"
        try:
            raw[key] = _from_cwd(key, parse(text))
        except ValueError as e:
            v.fail(key, f"is {_short(text)}; {e}")
    for key, value in (overrides or {}).items():
        if key == "publish" and value:  # --publish: on, in the file's mode if it has one
            raw[key] = _publish_on(raw.get(key))
            origins[key] = "publish (--publish on the command line)"
        elif value is not None and key != "publish":
            raw[key] = _from_cwd(key, value)
            origins[key] = f"{key} (from the command line)"
    boot_id_variable(environ)  # refused here too, so that a pull says so before it starts
    cfg = _parse(raw, source, base, origins)
    secret = environ.get(SIGNING_KEY_VAR, "")
    if secret:
        if cfg.signing_key is not None:
            raise ConfigError(f"both ${SIGNING_KEY_VAR} and signing_key_file are set; keep one")
        cfg = replace(cfg, signing_key=signing.load_secret(secret, f"${SIGNING_KEY_VAR}"))
    node_secret = environ.get(NODE_KEY_VAR, "")
    if node_secret:
        if cfg.node_key is not None:
            raise ConfigError(f"both ${NODE_KEY_VAR} and node_key_file are set; keep one")
        cfg = replace(cfg, node_key=signing.load_secret(node_secret, f"${NODE_KEY_VAR}"))
    _check_keys(cfg)
    return cfg


def _publish_on(value: Any) -> Any:
    """The `publish` block once --publish is given: the file's, in mode cold unless it
    says misses; a value that is not a block is left for the validator to refuse."""
    if value is None or value is False:
        return {"mode": "cold"}
    if isinstance(value, dict):
        mode = value.get("mode", "off")
        return {**value, "mode": "cold" if mode in ("off", None) else mode}
    return value


def _check_keys(cfg: Config) -> None:
    """A node key is trusted for node publishes only: one that is also a seed key (by name
    or by key), or the seed's own signing key, would let a node pass as the seed. And a
    node that trusts node keys must trust seed keys too: without them it takes unsigned
    seed manifests, which whoever holds the write credentials of node publishes (any
    self-seeding pod) could plant."""
    if cfg.trusted_node_keys and not cfg.trusted_keys:
        raise ConfigError(
            f"{cfg.source}: trusted_node_keys needs trusted_keys too: without seed keys this "
            "node takes unsigned seed manifests, which any pod holding the store's write "
            "credentials (as self-seeding nodes do) could write; sign the seed "
            "(`torchwarm keygen seed-1`, signing_key_file) and list its key in trusted_keys"
        )
    seed = {name: key.public_bytes_raw() for name, key in cfg.trusted_keys.keys.items()}
    for name, key in cfg.trusted_node_keys.keys.items():
        if name in seed or key.public_bytes_raw() in seed.values():
            raise ConfigError(
                f"{cfg.source}: trusted_node_keys holds {name!r}, which trusted_keys holds too; "
                "a node key must be a key of its own (`torchwarm keygen node-1`), never a seed key"
            )
    if cfg.node_key is None:
        return
    mine = cfg.node_key.public_raw()
    if mine in seed.values() or (
        cfg.signing_key is not None and mine == cfg.signing_key.public_raw()
    ):
        raise ConfigError(f"{cfg.source}: node_key is a seed key (the signing key, or one of "
                          "trusted_keys); give nodes a key of their own "
                          "(`torchwarm keygen node-1`)")  # fmt: skip


@dataclass(frozen=True)
class Fallback:
    """What a pull whose config does not load can still know: where its marker goes and
    whether it must fail (fail-closed) instead of starting the app cold."""

    cache_dir: Path | None
    marker: Path | None
    require: bool


def fallback(
    path: str | Path | None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Fallback:
    """Best effort, from the flags, the environment and whatever part of the YAML parses.

    Never raises: the gate calls it when load() failed, for whatever reason, to still
    write the marker and decide fail-open. A value that does not parse is unknown (the
    next source down is used), except `require`: set but unparsable, it reads as true,
    since whoever set it asked for something and only true differs from the default.
    """
    try:
        return _fallback(path, overrides or {}, os.environ if environ is None else environ)
    except Exception:  # noqa: BLE001 - a bug here must not stop a fail-open start
        return Fallback(None, None, False)


def _fallback(
    path: str | Path | None, overrides: Mapping[str, Any], environ: Mapping[str, str]
) -> Fallback:
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            loaded = _read_yaml(Path(path))
            base = Path(path).resolve().parent
        except Exception:  # noqa: BLE001 - an unreadable file tells nothing
            loaded = None
        raw = dict(loaded) if isinstance(loaded, dict) else {}
    for var, (key, parse) in ENV_VARS.items():
        if environ.get(var, "") != "":
            try:
                raw[key] = _from_cwd(key, parse(environ[var]))
            except ValueError:
                if key == "require":
                    raw[key] = True
    for key, value in overrides.items():
        if value is not None:
            raw[key] = _from_cwd(key, value)

    def as_path(value: Any) -> Path | None:
        if not isinstance(value, str) or not value or "\0" in value:
            return None
        try:
            return (base / os.path.expanduser(value)).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            return None

    cache_dir = as_path(raw.get("cache_dir"))
    marker = as_path(raw.get("marker"))
    if marker is None and cache_dir is not None:
        marker = cache_dir.parent / "torchwarm-ready.json"
    req = raw.get("require", False)
    word = req.lower() if isinstance(req, str) else None
    require = req if isinstance(req, bool) else word not in (*_FALSE, "")
    return Fallback(cache_dir, marker, require)


def _from_cwd(key: str, value: Any) -> Any:
    """Relative paths given in the environment or on the command line mean the working dir."""
    if (
        key in ("store", "cache_dir", "marker", "signing_key_file", "node_key_file")
        and isinstance(value, str)
        and "://" not in value
    ):
        return os.path.abspath(value) if value and "\0" not in value else value
    return value


def _parse(
    raw: dict[str, Any], source: str, base: Path, origins: dict[str, str] | None = None
) -> Config:
    v = _Validator(source, origins or {})
    known = {
        "store", "store_options", "cache_dir", "format", "marker", "require", "deadline_s",
        "daemon", "signing_key_file", "trusted_keys", "workloads", "warmup_timeout_s", "env",
        "publish", "node_key_file", "trusted_node_keys",
    }  # fmt: skip
    v.no_unknown(raw, known, "")
    if "store" not in raw:
        v.fail("store", "is required: a store URL such as file:///var/lib/torchwarm/store")
    store = _store_url(v, raw["store"], base)
    store_options = _store_options(v, raw.get("store_options"))
    if "cache_dir" not in raw:
        v.fail("cache_dir", "is required: the TORCHINDUCTOR_CACHE_DIR of the main process")
    cache_dir = _path(v, "cache_dir", raw["cache_dir"], base)
    fmt = v.choice("format", raw.get("format", DEFAULT_FORMAT), FORMATS)
    marker = _path(v, "marker", raw["marker"], base) if raw.get("marker") is not None else None
    require = v.boolean("require", raw.get("require", False))
    deadline_s = v.positive("deadline_s", raw.get("deadline_s", DEFAULT_DEADLINE_S))
    timeout = raw.get("warmup_timeout_s", DEFAULT_WARMUP_TIMEOUT_S)
    warmup_timeout_s = v.positive("warmup_timeout_s", timeout)
    workloads_raw = raw.get("workloads", [])
    if not isinstance(workloads_raw, list):
        v.fail("workloads", f"must be a list of workloads, got {_kind(workloads_raw)}")
    workloads = tuple(
        _workload(v, f"workloads[{i}]", w, warmup_timeout_s, base)
        for i, w in enumerate(workloads_raw)
    )
    names = [w.name for w in workloads]
    for i, n in enumerate(names):
        if n in names[:i]:
            v.fail(f"workloads[{i}].name", f"duplicate workload name {n!r}")
    from torchwarm.seed import kinds  # imports this module: here, once it is loaded

    for i, w in enumerate(workloads):
        kind = kinds.of(w)
        if fmt not in kind.formats:
            v.fail(
                "format",
                f"is {fmt!r}, but workloads[{i}] ({w.name!r}) is a {kind.name} workload, "
                f"which can only be captured as {' or '.join(kind.formats)} "
                f"({kind.formats_why}); use format: {kind.formats[0]}",
            )
    env = _env(v, "env", raw.get("env"), reaches_app=True)
    signing_key = None
    if raw.get("signing_key_file") is not None:
        signing_key = signing.load_secret_file(
            _path(v, "signing_key_file", raw["signing_key_file"], base)
        )
    node_key = None
    if raw.get("node_key_file") is not None:
        node_key = signing.load_secret_file(_path(v, "node_key_file", raw["node_key_file"], base))

    def trusted(key: str, example: str) -> TrustedKeys:
        texts = raw.get(key, [])
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            v.fail(key, f"must be a list of public keys like '{example}:base64…'")
        return signing.load_trusted(texts, f"{source}: {v.origins.get(key, key)}")

    return Config(
        store, cache_dir, fmt, marker, require, deadline_s, workloads, source, store_options,
        _daemon(v, raw.get("daemon")), signing_key, trusted("trusted_keys", "seed-1"),
        warmup_timeout_s, env, _publish(v, raw.get("publish")), node_key,
        trusted("trusted_node_keys", "node-1"),
    )  # fmt: skip


def _store_url(v: _Validator, value: Any, base: Path) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        v.fail("store", f"must be a URL string, got {_kind(value)}")
    if "://" in value:
        scheme = value.partition("://")[0]
        if scheme not in SCHEMES:
            urls = ", ".join(f"{s}://" for s in SCHEMES)
            v.fail("store", f"has an unsupported scheme {scheme!r}; expected {urls} or a folder")
        return value
    # A bare path means a local folder, relative to the config file.
    return (base / value).resolve().as_uri()


def _store_options(v: _Validator, value: Any) -> StoreOptions:
    if value is None:
        return StoreOptions()
    if not isinstance(value, dict):
        v.fail("store_options", f"must be a mapping, got {_kind(value)}")
    defaults = StoreOptions()
    known = {f.name for f in fields(StoreOptions)}
    v.no_unknown(value, known, "store_options")
    for name, given in value.items():
        default = getattr(defaults, name)
        if isinstance(default, bool) or default is None or isinstance(default, str):
            want: Any = bool if isinstance(default, bool) else str
            ok = isinstance(given, want) or (default is None and given is None)
        elif isinstance(default, int):
            want, ok = int, isinstance(given, int) and not isinstance(given, bool)
        else:
            want = float
            ok = isinstance(given, int | float) and not isinstance(given, bool)
        if not ok:
            kind = {bool: "true or false", str: "a string", int: "an integer"}.get(want, "a number")
            v.fail(f"store_options.{name}", f"is {_short(given)}; expected {kind}")
        if name in STORE_RANGES:
            low, high = STORE_RANGES[name]
            number = _number(given)
            inside = number is not None and (low < number if want is float else low <= number)
            if not (inside and number <= high):
                span = f"above {low:g} and at most" if want is float else f"from {low:g} to"
                v.fail(f"store_options.{name}", f"is {_short(given)}; expected {span} {high:.0f}")
    try:
        return StoreOptions(**value)
    except (TypeError, ValueError, ConfigError) as e:
        v.fail("store_options", f"is invalid: {e}")


def _publish(v: _Validator, value: Any) -> PublishOptions:
    if value is None or value is False:
        return PublishOptions()
    if value is True:
        return PublishOptions(mode="cold")
    if not isinstance(value, dict):
        v.fail("publish", f"must be a mapping (mode, ready_url, quiet_s, max_bytes), got "
                          f"{_kind(value)}")  # fmt: skip
    v.no_unknown(value, {"mode", "ready_url", "quiet_s", "max_bytes"}, "publish")
    d = PublishOptions()
    mode = v.choice("publish.mode", value.get("mode", d.mode), PUBLISH_MODES)
    url = value.get("ready_url")
    if url is not None and not _loopback_http(url):
        v.fail(
            "publish.ready_url",
            f"is {_short(url)}; expected http://127.0.0.1:PORT/PATH "
            "(or localhost, [::1]): the app's own readiness endpoint, beside this agent",
        )
    size = value.get("max_bytes", d.max_bytes)
    if not _posint(size):
        v.fail("publish.max_bytes", f"is {_short(size)}; expected a positive number of bytes")
    quiet = v.positive("publish.quiet_s", value.get("quiet_s", d.quiet_s))
    return PublishOptions(mode, url, quiet, size)


def _loopback_http(url: Any) -> bool:
    """An http:// URL to this machine: the agent polls it, and a config must not make it
    send requests elsewhere."""
    if not isinstance(url, str) or any(c.isspace() or ord(c) < 32 for c in url):
        return False
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # ValueError when it is not a number in 0-65535
    except ValueError:
        return False
    return (
        parts.scheme == "http"
        and parts.hostname in _LOOPBACK
        and port != 0
        and not parts.username
        and not parts.password
    )


def _daemon(v: _Validator, value: Any) -> DaemonOptions:
    if value is None:
        return DaemonOptions()
    if not isinstance(value, dict):
        v.fail("daemon", f"must be a mapping, got {_kind(value)}")
    v.no_unknown(value, {"interval_s", "jitter", "listen", "backoff_max_s", "refresh_s"}, "daemon")
    d = DaemonOptions()
    jitter = value.get("jitter", d.jitter)
    if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter < 1:
        v.fail("daemon.jitter", f"is {jitter!r}; expected a fraction from 0 to below 1")
    listen = value.get("listen")
    if listen is not None and (not isinstance(listen, str) or ":" not in listen):
        v.fail("daemon.listen", f"is {listen!r}; expected HOST:PORT, e.g. 0.0.0.0:8478")
    return DaemonOptions(
        v.positive("daemon.interval_s", value.get("interval_s", d.interval_s)),
        float(jitter),
        listen,
        v.positive("daemon.backoff_max_s", value.get("backoff_max_s", d.backoff_max_s)),
        v.positive("daemon.refresh_s", value.get("refresh_s", d.refresh_s)),
    )


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, what: str) -> float:
    """Seconds in '30d', '12h', '90m', '3600s' or '3600'; ConfigError naming `what`."""
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise ConfigError(f"{what} {text!r}: expected a duration such as 30d, 12h, 90m or 3600s")
    return float(m[1]) * _UNIT_S[m[2]]


def _path(v: _Validator, key: str, value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value or "\0" in value:
        v.fail(key, f"must be a path string without NUL characters, got {_kind(value)}")
    return (base / os.path.expanduser(value)).resolve()


def parse_workload(doc: Any, source: str) -> Workload:
    """One model workload from a mapping shaped like a `workloads` entry (the warm-up child
    gets its workload this way, as JSON, instead of the config file)."""
    return _workload(_Validator(source, {}), "workload", doc, DEFAULT_WARMUP_TIMEOUT_S, Path.cwd())


def _workload(v: _Validator, at: str, w: Any, default_timeout_s: float, base: Path) -> Workload:
    if not isinstance(w, dict):
        v.fail(at, f"must be a mapping, got {_kind(w)}")
    v.no_unknown(w, {"name", "warmup_timeout_s", "at_node_path", *MODEL_KEYS, *COMMAND_KEYS}, at)
    if "name" not in w:
        v.fail(f"{at}.name", "is required")
    name = w["name"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        v.fail(f"{at}.name", "must be 1-64 characters of letters, digits, '.', '_', '-'")
    if "model" in w and "command" in w:
        v.fail(at, "sets both model and command; a workload is one or the other")
    if "model" not in w and "command" not in w:
        v.fail(f"{at}.model", "is required (or command, for a workload that is your own process)")
    is_command = "command" in w
    for key in MODEL_KEYS if is_command else COMMAND_KEYS:
        if key in w:  # (model and command together were refused above)
            v.fail(
                f"{at}.{key}",
                "applies to model workloads only; a command workload compiles what its "
                "process compiles"
                if is_command
                else "applies to command workloads only (those that set command)",
            )
    timeout_s = v.positive(f"{at}.warmup_timeout_s", w.get("warmup_timeout_s", default_timeout_s))
    at_node_path = v.boolean(f"{at}.at_node_path", w.get("at_node_path", is_command))
    if is_command:
        command = _command(v, at, w, base)
        return Workload(name, None, (), warmup_timeout_s=timeout_s, command=command,
                        at_node_path=at_node_path)  # fmt: skip
    if "inputs" not in w:
        v.fail(f"{at}.inputs", "is required")
    model = w["model"]
    if not isinstance(model, str) or not _FACTORY.fullmatch(model):
        v.fail(f"{at}.model", "must be 'package.module:callable', e.g. torchwarm.models:mlp")
    kwargs = w.get("model_kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        v.fail(f"{at}.model_kwargs", "must be a mapping of argument names to values")
    inputs = w["inputs"]
    if not isinstance(inputs, list) or not inputs:
        v.fail(f"{at}.inputs", "must be a non-empty list of input sets (one per batch size)")
    parsed = [_input_set(v, f"{at}.inputs[{i}]", s) for i, s in enumerate(inputs)]
    sets = tuple(args for args, _ in parsed)
    by_name = tuple(kw for _, kw in parsed) if any(kw for _, kw in parsed) else ()
    method = w.get("method", "__call__")
    if not isinstance(method, str) or not _METHOD.fullmatch(method):
        v.fail(f"{at}.method", "must be the name of a method of the model, e.g. generate")
    device = w.get("device", "cpu")
    if not isinstance(device, str) or not re.fullmatch(r"(cpu|cuda(:\d+)?|xpu(:\d+)?)", device):
        v.fail(f"{at}.device", "must be 'cpu', 'cuda' or 'cuda:N'")
    mode = v.choice(f"{at}.mode", w.get("mode", "inference"), MODES)
    seed = w.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        v.fail(f"{at}.seed", "must be an integer")
    compile_options = _compile(v, f"{at}.compile", w.get("compile", {}))
    if method != "__call__" and compile_options.target != "forward":
        v.fail(
            f"{at}.compile.target",
            f"must be forward when method is {method!r}: {method}() calls the model's "
            "forward, which torch.compile(model) leaves uncompiled (the app sets "
            "model.forward = torch.compile(model.forward))",
        )
    if method != "__call__" and mode == "train":
        v.fail(f"{at}.method", f"is {method!r}; a training workload calls the model itself")
    return Workload(
        name=name,
        model=model,
        inputs=sets,
        model_kwargs=dict(kwargs),
        device=device,
        mode=mode,
        compile=compile_options,
        seed=seed,
        warmup_timeout_s=timeout_s,
        kwargs=by_name,
        method=method,
        at_node_path=at_node_path,
    )


def workload_doc(w: Workload) -> dict[str, Any]:
    """A model workload as a `workloads` entry that parse_workload reads back the same
    (the warm-up child gets its workload this way)."""
    assert w.command is None, "a command workload never goes to the warm-up child"
    doc = {k: v for k, v in asdict(w).items() if k not in ("command", "kwargs")}
    doc["inputs"] = [
        {"args": [asdict(t) for t in args], "kwargs": _kwargs_doc(w.call_kwargs(i))}
        for i, args in enumerate(w.inputs)
    ]
    return doc


def _kwargs_doc(kw: Mapping[str, TensorSpec | Constant]) -> dict[str, Any]:
    return {k: asdict(x) if isinstance(x, TensorSpec) else x for k, x in kw.items()}


def _command(v: _Validator, at: str, w: dict[str, Any], base: Path) -> Command:
    argv = w["command"]
    if (
        not isinstance(argv, list)
        or not argv
        or not all(isinstance(a, str) and "\0" not in a for a in argv)
        or not argv[0]
    ):
        v.fail(
            f"{at}.command",
            "must be a non-empty list of argument strings, run without a shell, "
            "e.g. [python, warm.py, --requests, '3']",
        )
    cwd = _path(v, f"{at}.cwd", w["cwd"], base) if "cwd" in w else base
    code = w.get("code", [])
    if not isinstance(code, list):
        v.fail(f"{at}.code", f"must be a list of files or folders, got {_kind(code)}")
    paths = tuple(_path(v, f"{at}.code[{i}]", c, base) for i, c in enumerate(code))
    # Only the top-level env reaches the app (torchwarm run): a cache root named here
    # would be shipped, and the app would never look into it.
    env = _env(v, f"{at}.env", w.get("env"), reaches_app=False)
    server = _server(v, f"{at}.server", w["server"]) if "server" in w else None
    return Command(tuple(argv), cwd, env, paths, server)


def _server(v: _Validator, at: str, s: Any) -> Server:
    if not isinstance(s, dict):
        v.fail(
            at, f"must be a mapping like {{port: 8000, ready: {{http: /healthz}}}}, got {_kind(s)}"
        )
    v.no_unknown(
        s, {"port", "ready", "ready_timeout_s", "requests", "request_timeout_s", "stop"}, at
    )
    port = s.get("port")
    if not _posint(port) or port > 65535:
        v.fail(f"{at}.port", "must be the TCP port it listens on at 127.0.0.1 (1-65535)")
    ready = s.get("ready")
    if not isinstance(ready, dict) or len(ready) != 1 or next(iter(ready)) not in READY_CHECKS:
        v.fail(
            f"{at}.ready",
            "must be one check: {http: /healthz} (GET until 2xx), {tcp: true} (the port "
            "accepts) or {log: 'regex'} (a line of its output matches)",
        )
    check, target = next(iter(ready.items()))
    if check == "http" and not (isinstance(target, str) and _is_path(target)):
        v.fail(f"{at}.ready.http", f"must be a path starting with '/' {_PATH_RULE}, e.g. /healthz")
    if check == "tcp" and target is not True:
        v.fail(f"{at}.ready.tcp", "must be true (the port is server.port)")
    if check == "log":
        if not isinstance(target, str) or not target:
            v.fail(f"{at}.ready.log", "must be a regular expression")
        try:
            re.compile(target)
        except re.error as e:
            v.fail(f"{at}.ready.log", f"is not a regular expression: {e}")
    requests = s.get("requests", [])
    if not isinstance(requests, list):
        v.fail(f"{at}.requests", f"must be a list of requests, got {_kind(requests)}")
    reqs = tuple(_request(v, f"{at}.requests[{i}]", r) for i, r in enumerate(requests))
    if sum(r.repeat for r in reqs) > MAX_REQUESTS:
        v.fail(f"{at}.requests", f"sends more than {MAX_REQUESTS} requests, repeats counted")
    stop = s.get("stop", {})
    if not isinstance(stop, dict):
        v.fail(
            f"{at}.stop",
            f"must be a mapping like {{signal: SIGTERM, grace_s: 30}}, got {_kind(stop)}",
        )
    v.no_unknown(stop, {"signal", "grace_s"}, f"{at}.stop")
    return Server(
        port=port,
        ready=check,
        ready_target="" if check == "tcp" else target,
        ready_timeout_s=v.positive(f"{at}.ready_timeout_s",
                                   s.get("ready_timeout_s", DEFAULT_READY_TIMEOUT_S)),
        requests=reqs,
        request_timeout_s=v.positive(f"{at}.request_timeout_s",
                                     s.get("request_timeout_s", DEFAULT_READY_TIMEOUT_S)),
        stop_signal=v.choice(f"{at}.stop.signal", stop.get("signal", "SIGTERM"), STOP_SIGNALS),
        stop_grace_s=v.positive(f"{at}.stop.grace_s", stop.get("grace_s", DEFAULT_STOP_GRACE_S)),
    )  # fmt: skip


_PATH_RULE = "in printable ASCII without spaces (percent-encode others: é is %C3%A9)"


def _is_path(text: str) -> bool:
    """An HTTP request target on the server itself: '/...', printable ASCII, no spaces
    (http.client sends the target as ASCII and refuses anything else)."""
    return (text.startswith("/") and text.isascii() and text.isprintable() and " " not in text
            and len(text) <= 2048)  # fmt: skip


def _request(v: _Validator, at: str, r: Any) -> WarmRequest:
    if not isinstance(r, dict):
        v.fail(at, f"must be a mapping like {{method: POST, path: /predict, json: {{...}}}}, "
                   f"got {_kind(r)}")  # fmt: skip
    v.no_unknown(r, {"method", "path", "json", "repeat", "status"}, at)
    method = v.choice(f"{at}.method", r.get("method", "GET"), HTTP_METHODS)
    path = r.get("path", "/")
    if not isinstance(path, str) or not _is_path(path):
        v.fail(f"{at}.path", f"must be a path starting with '/' {_PATH_RULE}, e.g. /v1/completions")
    body = r.get("json")
    try:
        json.dumps(body, allow_nan=False)
    except (TypeError, ValueError) as e:
        v.fail(f"{at}.json", f"cannot be sent as JSON: {e}")
    repeat = r.get("repeat", 1)
    if not _posint(repeat):
        v.fail(f"{at}.repeat", "must be a positive integer")
    status = r.get("status", 200)
    if not _posint(status) or not 100 <= status <= 599:
        v.fail(f"{at}.status", "must be an HTTP status code (100-599)")
    return WarmRequest(method, path, body, repeat, status)


def _env(v: _Validator, at: str, value: Any, reaches_app: bool) -> dict[str, str]:
    """An `env` mapping: variable names to strings (integers are taken as written).
    {cache_dir} only where the variable `reaches_app` (the top-level env)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        v.fail(at, f"must be a mapping of variable names to strings, got {_kind(value)}")
    out = {}
    for name, given in value.items():
        key = f"{at}.{_show(name)}"
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            v.fail(key, "is not a variable name (letters, digits and '_', not first a digit)")
        if name.startswith("TORCHWARM_"):
            v.fail(key, "is torchwarm's own; the warm-up and the app never get TORCHWARM_* "
                        "variables (the warm-up must hold no signing key)")  # fmt: skip
        if name in _SET_BY_TORCHWARM:
            v.fail(key, _SET_BY_TORCHWARM[name])
        if isinstance(given, int) and not isinstance(given, bool):
            given = str(given)
        if not isinstance(given, str) or "\0" in given:
            v.fail(key, f"is {given!r}; expected a string (quote it in the YAML)")
        if PLACEHOLDER in given and not reaches_app:
            v.fail(
                key,
                f"uses {PLACEHOLDER}, but a workload's env reaches only its "
                "warm-up, so the app would never look there; set it in the top-level env, "
                "which torchwarm run gives the app too",
            )
        out[name] = given
    return out


# Variables torchwarm itself sets for the warm-up and the app: the reason each is refused.
_SET_BY_TORCHWARM = {
    "TORCHINDUCTOR_CACHE_DIR": "is set by torchwarm (cache_dir on a node, an empty folder "
    "for each warm-up); put other caches under it with {cache_dir}/NAME",
    "TRITON_CACHE_DIR": "is left unset by torchwarm so that Triton's cache lives inside "
    "TORCHINDUCTOR_CACHE_DIR and travels with it; remove it",
    "TORCH_CACHING_PRECOMPILE": "is decided by torchwarm (format precompile, and torchwarm "
    "run where precompiled entries were installed); remove it",
}


def _compile(v: _Validator, at: str, c: Any) -> CompileOptions:
    if c is None:
        c = {}
    if not isinstance(c, dict):
        v.fail(at, f"must be a mapping, got {_kind(c)}")
    v.no_unknown(c, {"backend", "mode", "fullgraph", "dynamic", "target"}, at)
    backend = c.get("backend", "inductor")
    if not isinstance(backend, str) or not backend:
        v.fail(f"{at}.backend", "must be a backend name such as inductor")
    mode = v.choice(f"{at}.mode", c.get("mode"), COMPILE_MODES)
    dynamic = c.get("dynamic")
    if dynamic is not None and not isinstance(dynamic, bool):
        v.fail(f"{at}.dynamic", "must be true, false or null")
    target = v.choice(f"{at}.target", c.get("target", "module"), COMPILE_TARGETS)
    return CompileOptions(
        backend, mode, v.boolean(f"{at}.fullgraph", c.get("fullgraph", False)), dynamic, target
    )


def _input_set(
    v: _Validator, at: str, s: Any
) -> tuple[tuple[TensorSpec, ...], dict[str, TensorSpec | Constant]]:
    """One input set: positional tensors (a list, or one tensor's mapping), or a mapping
    {args: [tensors], kwargs: {name: tensor or constant}}."""
    if isinstance(s, dict) and ("args" in s or "kwargs" in s):
        v.no_unknown(s, {"args", "kwargs"}, at)
        args, kw = s.get("args", []), s.get("kwargs", {})
        if not isinstance(args, list):
            v.fail(f"{at}.args", f"must be a list of tensors, got {_kind(args)}")
        if not isinstance(kw, dict):
            v.fail(f"{at}.kwargs", f"must be a mapping of argument names, got {_kind(kw)}")
        if not args and not kw:
            v.fail(at, "has neither args nor kwargs; give the call at least one input")
        by_name = {}
        for name, value in kw.items():
            key = f"{at}.kwargs.{_show(name)}"
            if not isinstance(name, str) or not name.isidentifier():
                v.fail(key, "is not an argument name")
            by_name[name] = _keyword(v, key, value)
        return tuple(_tensor(v, f"{at}.args[{i}]", t) for i, t in enumerate(args)), by_name
    if isinstance(s, dict):
        s = [s]  # a single tensor may be written without the list
    if not isinstance(s, list) or not s:
        v.fail(at, "must be a non-empty list of tensors ({shape: [...], dtype: ...}), or "
                   "{args: [...], kwargs: {...}}")  # fmt: skip
    return tuple(_tensor(v, f"{at}[{i}]", t) for i, t in enumerate(s)), {}


def _keyword(v: _Validator, at: str, value: Any) -> TensorSpec | Constant:
    """A keyword input: a tensor (a mapping with a shape) or a plain value."""
    if isinstance(value, dict):
        return _tensor(v, at, value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    v.fail(at, f"must be a tensor ({{shape: [...], dtype: ...}}) or a plain value "
               f"(number, string, true/false, null), got {_kind(value)}")  # fmt: skip


def _tensor(v: _Validator, at: str, t: Any) -> TensorSpec:
    if not isinstance(t, dict):
        v.fail(at, f"must be a mapping like {{shape: [4, 64], dtype: float32}}, got {_kind(t)}")
    v.no_unknown(t, {"shape", "dtype", "dynamic", "high", "fill"}, at)
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(_posint(d) for d in shape):
        v.fail(f"{at}.shape", "must be a list of positive integers")
    dtype = v.choice(f"{at}.dtype", t.get("dtype", "float32"), DTYPES)
    dynamic = t.get("dynamic", [])
    if not isinstance(dynamic, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < len(shape) for d in dynamic
    ):
        v.fail(f"{at}.dynamic", f"must be a list of dimension indexes below {len(shape)}")
    high = t.get("high", 2)
    if not _posint(high):
        v.fail(f"{at}.high", "must be a positive integer")
    fill = t.get("fill")
    if fill is not None and (isinstance(fill, str) or _number(fill) is None):
        v.fail(f"{at}.fill", "must be a number (every element takes it), or null for random")
    return TensorSpec(tuple(shape), dtype, tuple(dynamic), high, fill)


def _show(key: Any) -> str:
    """A key as written, or quoted when it would not read as one plain word."""
    s = str(key)
    return s if re.fullmatch(r"[\w.-]+", s) else repr(key)


def _posint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _number(x: Any) -> float | None:
    """`x` as a finite float (a number, or a string that reads as one), else None."""
    if isinstance(x, bool) or not isinstance(x, int | float | str):
        return None
    try:
        number = float(x)
    except (ValueError, OverflowError):  # "soon"; an int of 400 digits
        return None
    return number if math.isfinite(number) else None


def _short(x: Any) -> str:
    """`repr(x)`, cut to one readable length (a hostile value may be a megabyte)."""
    text = repr(x)
    return text if len(text) <= 80 else f"{text[:60]}… ({len(text)} characters)"


def _kind(x: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(x), type(x).__name__
    )


class _Validator:
    def __init__(self, source: str, origins: dict[str, str]) -> None:
        self.source = source
        self.origins = origins

    def fail(self, key: str, what: str) -> NoReturn:
        raise ConfigError(f"{self.source}: {self.origins.get(key, key) or '(top level)'} {what}")

    def no_unknown(self, d: dict[str, Any], known: set[str], at: str) -> None:
        for k in d:
            if k not in known:
                self.fail(
                    f"{at}.{_show(k)}" if at else _show(k),
                    f"is not a known key; expected one of: {', '.join(sorted(known))}",
                )

    def choice(self, key: str, value: Any, allowed: tuple[Any, ...]) -> Any:
        if value not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            self.fail(key, f"is {value!r}; expected one of: {shown}")
        return value

    def positive(self, key: str, value: Any) -> float:
        """Seconds: a finite number above 0, at most MAX_SECONDS of the key's name."""
        most = MAX_SECONDS[key.rpartition(".")[2]]
        number = _number(value)
        if number is None or not 0 < number <= most:
            self.fail(key, f"is {_short(value)}; expected a positive number of seconds, "
                           f"at most {most:.0f}")  # fmt: skip
        return number

    def boolean(self, key: str, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off", ""):
            return False
        self.fail(key, f"is {value!r}; expected true or false")
