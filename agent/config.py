"""The one typed settings object, built from YAML, then TORCHWARM_* environment, then flags.

Precedence (later wins): built-in defaults < YAML file < environment < command-line flags.
Every environment variable torchwarm reads is read here (torch's own TORCHINDUCTOR_*
variables are read by fingerprint.py, because they are facts about the machine, not settings).
Validation errors name the file and the key path, and say what was expected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NoReturn

import yaml

from torchwarm.env.torchenv import PLACEHOLDER
from torchwarm.errors import ConfigError
from torchwarm.spec import signing
from torchwarm.spec.signing import SigningKey, TrustedKeys
from torchwarm.stores import Store, StoreOptions, open_store

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
MODEL_KEYS = ("model", "model_kwargs", "inputs", "device", "mode", "compile", "seed")
COMMAND_KEYS = ("command", "cwd", "env", "code")


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str = "float32"
    dynamic: tuple[int, ...] = ()  # dims passed to torch._dynamo.mark_dynamic
    high: int = 2  # exclusive upper bound of random integers (int dtypes only)


@dataclass(frozen=True)
class CompileOptions:
    backend: str = "inductor"
    mode: str | None = None
    fullgraph: bool = False
    dynamic: bool | None = None

    def as_kwargs(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "mode": self.mode,
            "fullgraph": self.fullgraph,
            "dynamic": self.dynamic,
        }


@dataclass(frozen=True)
class Command:
    """A workload that is a process of the user's own (a warm-up script, a server start
    plus a warm request): torchwarm runs it, it compiles whatever it compiles."""

    argv: tuple[str, ...]  # run as is: no shell
    cwd: Path  # absolute; from the YAML, relative to the config file's folder
    env: Mapping[str, str] = field(default_factory=dict)  # for the warm-up only, unexpanded
    code: tuple[Path, ...] = ()  # files and folders whose content is hashed into the key


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


@dataclass(frozen=True)
class DaemonOptions:
    interval_s: float = 3600.0  # between passes; each wait is jittered by ±jitter
    jitter: float = 0.1
    listen: str | None = None  # HOST:PORT for /metrics and /healthz; None: no HTTP
    backoff_max_s: float = 3600.0  # a failing workload is retried after 60 s, doubling to this
    # A skipped workload's manifest older than this is touched, so that gc's --older-than
    # (default 30 days) never takes an environment a seed still serves for dead.
    refresh_s: float = 7 * 86400.0


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


# Environment variables, in one table: name -> Config field.
ENV_VARS = {
    "TORCHWARM_STORE": "store",
    "TORCHWARM_CACHE_DIR": "cache_dir",
    "TORCHWARM_FORMAT": "format",
    "TORCHWARM_MARKER": "marker",
    "TORCHWARM_REQUIRE": "require",
    "TORCHWARM_DEADLINE_S": "deadline_s",
    "TORCHWARM_SIGNING_KEY_FILE": "signing_key_file",
    "TORCHWARM_TRUSTED_KEYS": "trusted_keys",  # space- or comma-separated public keys
}
# The secret key itself may come from the environment (a Kubernetes Secret as env),
# never from the YAML file.
SIGNING_KEY_VAR = "TORCHWARM_SIGNING_KEY"


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
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the config file: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: is not UTF-8 text; save the config as UTF-8") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or "invalid YAML"
            raise ConfigError(f"{p}{where}: {problem}; fix the YAML syntax") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping, got {_kind(loaded)}")
        raw = loaded
    origins: dict[str, str] = {}
    for var, key in ENV_VARS.items():
        if environ.get(var, "") != "":
            value = environ[var]
            raw[key] = value.replace(",", " ").split() if key == "trusted_keys" else value
            raw[key] = _from_cwd(key, raw[key])
            origins[key] = f"{key} (from ${var})"
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = _from_cwd(key, value)
            origins[key] = f"{key} (from the command line)"
    cfg = _parse(raw, source, base, origins)
    secret = environ.get(SIGNING_KEY_VAR, "")
    if secret:
        if cfg.signing_key is not None:
            raise ConfigError(f"both ${SIGNING_KEY_VAR} and signing_key_file are set; keep one")
        cfg = replace(cfg, signing_key=signing.load_secret(secret, f"${SIGNING_KEY_VAR}"))
    return cfg


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
    """Best effort, from the flags, the environment and whatever part of the YAML parses."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
            base = Path(path).resolve().parent
        except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError):
            loaded = None
        raw = dict(loaded) if isinstance(loaded, dict) else {}
    for var, key in ENV_VARS.items():
        if environ.get(var):
            raw[key] = _from_cwd(key, environ[var])
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = value

    def as_path(value: Any) -> Path | None:
        if not isinstance(value, str) or not value or "\0" in value:
            return None
        return (base / os.path.expanduser(value)).resolve()

    cache_dir = as_path(raw.get("cache_dir"))
    marker = as_path(raw.get("marker"))
    if marker is None and cache_dir is not None:
        marker = cache_dir.parent / "torchwarm-ready.json"
    req = raw.get("require")
    require = req is True or (isinstance(req, str) and req.lower() in ("1", "true", "yes", "on"))
    return Fallback(cache_dir, marker, require)


def _from_cwd(key: str, value: Any) -> Any:
    """Relative paths given in the environment or on the command line mean the working dir."""
    if (
        key in ("store", "cache_dir", "marker", "signing_key_file")
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
    trusted = raw.get("trusted_keys", [])
    if not isinstance(trusted, list) or not all(isinstance(t, str) for t in trusted):
        v.fail("trusted_keys", "must be a list of public keys like 'seed-1:base64…'")
    return Config(
        store, cache_dir, fmt, marker, require, deadline_s, workloads, source, store_options,
        _daemon(v, raw.get("daemon")), signing_key,
        signing.load_trusted(trusted, f"{source}: {v.origins.get('trusted_keys', 'trusted_keys')}"),
        warmup_timeout_s, env,
    )  # fmt: skip


def _store_url(v: _Validator, value: Any, base: Path) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        v.fail("store", f"must be a URL string, got {_kind(value)}")
    if "://" in value:
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
            v.fail(f"store_options.{name}", f"is {given!r}; expected {kind}")
    try:
        return StoreOptions(**value)
    except (TypeError, ValueError, ConfigError) as e:
        v.fail("store_options", f"is invalid: {e}")


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
    v.no_unknown(w, {"name", "warmup_timeout_s", *MODEL_KEYS, *COMMAND_KEYS}, at)
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
    if is_command:
        command = _command(v, at, w, base)
        return Workload(name, None, (), warmup_timeout_s=timeout_s, command=command)
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
    sets = tuple(_input_set(v, f"{at}.inputs[{i}]", s) for i, s in enumerate(inputs))
    device = w.get("device", "cpu")
    if not isinstance(device, str) or not re.fullmatch(r"(cpu|cuda(:\d+)?|xpu(:\d+)?)", device):
        v.fail(f"{at}.device", "must be 'cpu', 'cuda' or 'cuda:N'")
    mode = v.choice(f"{at}.mode", w.get("mode", "inference"), MODES)
    seed = w.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        v.fail(f"{at}.seed", "must be an integer")
    return Workload(
        name=name,
        model=model,
        inputs=sets,
        model_kwargs=dict(kwargs),
        device=device,
        mode=mode,
        compile=_compile(v, f"{at}.compile", w.get("compile", {})),
        seed=seed,
        warmup_timeout_s=timeout_s,
    )


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
    return Command(tuple(argv), cwd, env, paths)


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
    v.no_unknown(c, {"backend", "mode", "fullgraph", "dynamic"}, at)
    backend = c.get("backend", "inductor")
    if not isinstance(backend, str) or not backend:
        v.fail(f"{at}.backend", "must be a backend name such as inductor")
    mode = v.choice(f"{at}.mode", c.get("mode"), COMPILE_MODES)
    dynamic = c.get("dynamic")
    if dynamic is not None and not isinstance(dynamic, bool):
        v.fail(f"{at}.dynamic", "must be true, false or null")
    return CompileOptions(
        backend, mode, v.boolean(f"{at}.fullgraph", c.get("fullgraph", False)), dynamic
    )


def _input_set(v: _Validator, at: str, s: Any) -> tuple[TensorSpec, ...]:
    if isinstance(s, dict):
        s = [s]  # a single tensor may be written without the list
    if not isinstance(s, list) or not s:
        v.fail(at, "must be a non-empty list of tensors ({shape: [...], dtype: ...})")
    return tuple(_tensor(v, f"{at}[{i}]", t) for i, t in enumerate(s))


def _tensor(v: _Validator, at: str, t: Any) -> TensorSpec:
    if not isinstance(t, dict):
        v.fail(at, f"must be a mapping like {{shape: [4, 64], dtype: float32}}, got {_kind(t)}")
    v.no_unknown(t, {"shape", "dtype", "dynamic", "high"}, at)
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
    return TensorSpec(tuple(shape), dtype, tuple(dynamic), high)


def _show(key: Any) -> str:
    """A key as written, or quoted when it would not read as one plain word."""
    s = str(key)
    return s if re.fullmatch(r"[\w.-]+", s) else repr(key)


def _posint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


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
        try:
            number = float(value) if not isinstance(value, bool) else -1.0
        except (TypeError, ValueError):
            number = -1.0
        if not number > 0 or number == float("inf"):
            self.fail(key, f"is {value!r}; expected a positive number of seconds")
        return number

    def boolean(self, key: str, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off", ""):
            return False
        self.fail(key, f"is {value!r}; expected true or false")
