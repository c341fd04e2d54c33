"""The messages between the pull's worker (node/job.py) and its gate (node/gate.py).

Each message is a dataclass below, sent as one JSON object per line, `{"t": TAG, ...}`;
`encode` and `decode` are the only code that turns them into bytes and back, for both
ends of the pipes. Decoding is strict: a line that is not JSON, an unknown tag, a missing,
extra or mistyped field is a MessageError, which the gate treats like any other failure
of its worker (cold; with `require`, exit 1).

The order the worker keeps: Phase / Fingerprinted / Timing at any time; per swap,
MayCommit, then it waits for the gate's Go (or is killed); right after its rename,
Installed for each workload of the swap; Failed / Fatal for what did not install;
Done last.

Errors travel with their class (any TorchwarmError subclass, by module and name), their
message on one line, and their attributes (`vars(e)`: an instance's `exit_code`,
ObjectTooLarge's `where`/`limit`/`version`, ...; a value JSON cannot hold arrives as
its str()). `as_error` first makes any exception a TorchwarmError.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import types
import typing
from dataclasses import dataclass
from typing import Any

from torchwarm.errors import InstallError, InternalError, TorchwarmError, one_line
from torchwarm.node.report import WorkloadOutcome


class MessageError(InternalError):
    """A line on the worker's pipe that is not a message of this module (a bug)."""


@dataclass(frozen=True)
class Phase:
    """What the worker does now (a deadline's message names it)."""

    phase: str


@dataclass(frozen=True)
class Fingerprinted:
    """This node's fingerprint digest, and how long reading it took."""

    digest: str
    seconds: float


@dataclass(frozen=True)
class Timing:
    """How long one step took (`resolve_s.<workload>`, `fetch_s.<workload>`, ...)."""

    name: str
    seconds: float


@dataclass(frozen=True)
class MayCommit:
    """The worker asks to swap a built tree in; it waits for Go, or is killed.

    `outcomes`: what each workload of the swap is once it is in. `staged`: (st_dev,
    st_ino) of the staging tree, which the rename keeps: if the worker stops before it
    reports Installed, the gate finds by this whether the cache dir is the new tree.
    """

    outcomes: list[WorkloadOutcome]
    staged: tuple[int, int]

    @property
    def workloads(self) -> list[str]:
        return [o.workload for o in self.outcomes]


@dataclass(frozen=True)
class Go:
    """The gate's answer to MayCommit: the deadline allows the swap."""


@dataclass(frozen=True)
class Installed:
    """One workload's tree is in the cache dir (sent right after the rename)."""

    outcome: WorkloadOutcome


@dataclass(frozen=True)
class Failed:
    """One workload will not be installed, and why."""

    workload: str
    error: TorchwarmError


@dataclass(frozen=True)
class Fatal:
    """The pull stopped: every workload not yet settled fails with `error`."""

    error: TorchwarmError


@dataclass(frozen=True)
class Done:
    """The worker has nothing more to say (it exits next)."""


Message = Phase | Fingerprinted | Timing | MayCommit | Go | Installed | Failed | Fatal | Done
_TAGS: dict[str, type] = {
    "phase": Phase,
    "fingerprint": Fingerprinted,
    "timing": Timing,
    "commit?": MayCommit,
    "go": Go,
    "installed": Installed,
    "failed": Failed,
    "fatal": Fatal,
    "done": Done,
}
_TAG_OF = {cls: tag for tag, cls in _TAGS.items()}


# -- errors -------------------------------------------------------------------------------


def as_error(e: BaseException) -> TorchwarmError:
    """`e` as the error a pull reports: a TorchwarmError as it is; an OSError (this
    node's disk or files: a full disk, an I/O error) an InstallError; anything else an
    InternalError (a bug)."""
    if isinstance(e, TorchwarmError):
        return e
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        return InstallError(one_line(f"I/O error on this node: {e.strerror or e}{where}"))
    return InternalError(one_line(f"internal error: {type(e).__name__}: {e} (a bug)"))


def _error_doc(e: TorchwarmError) -> dict[str, Any]:
    cls = type(e)
    return {
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "message": one_line(str(e)),
        "attrs": {k: _plain(v) for k, v in vars(e).items()},
    }


def _plain(value: Any) -> Any:
    """`value` if JSON holds it as it is, else its str()."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return str(value)
    return value


def _error_class(name: str, where: str) -> type[TorchwarmError]:
    module, _, qualname = name.partition(":")
    found: Any = None
    if module == "torchwarm" or module.startswith("torchwarm."):  # only torchwarm's own
        try:
            found = importlib.import_module(module)
            for part in qualname.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError):
            found = None
    if not (isinstance(found, type) and issubclass(found, TorchwarmError)):
        raise MessageError(f"{where}: {name!r} is not a torchwarm error class")
    return found


def _error_from(doc: Any, where: str) -> TorchwarmError:
    if not isinstance(doc, dict) or set(doc) != {"class", "message", "attrs"}:
        raise MessageError(f"{where}: an error needs exactly class, message and attrs")
    cls = _error_class(_typed(doc["class"], str, f"{where}.class"), where)
    message = _typed(doc["message"], str, f"{where}.message")
    attrs = _typed(doc["attrs"], dict[str, Any], f"{where}.attrs")
    error = cls.__new__(cls)  # its message as sent, whatever its __init__ takes
    Exception.__init__(error, message)
    error.__dict__.update(attrs)
    return error


# -- encode / decode ----------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """One message as its line on the pipe."""
    doc: dict[str, Any] = {"t": _TAG_OF[type(msg)]}
    for f in dataclasses.fields(msg):
        doc[f.name] = _to_json(getattr(msg, f.name))
    return (json.dumps(doc, allow_nan=False) + "\n").encode()


def _to_json(value: Any) -> Any:
    if isinstance(value, TorchwarmError):
        return _error_doc(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def decode(line: bytes) -> Message:
    """The message on one line (its newline optional); MessageError if it is not one."""
    try:
        doc = json.loads(line)
    except ValueError as e:
        raise MessageError(f"the pull worker sent a line that is not JSON ({e}): "
                           f"{line[:200]!r}; a bug, report it") from None  # fmt: skip
    if not isinstance(doc, dict) or doc.get("t") not in _TAGS:
        tag = doc.get("t") if isinstance(doc, dict) else None
        raise MessageError(f"the pull worker sent an unknown message {tag!r}: "
                           f"{line[:200]!r}; a bug, report it")  # fmt: skip
    tag = doc.pop("t")
    msg: Message = _dataclass(_TAGS[tag], doc, tag)
    return msg


def _dataclass(cls: type, doc: Any, where: str) -> Any:
    if not isinstance(doc, dict):
        raise MessageError(f"{where}: expected an object, got {type(doc).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if set(doc) != set(names):
        missing, extra = sorted(set(names) - set(doc)), sorted(set(doc) - set(names))
        raise MessageError(f"{where}: fields missing {missing}, unexpected {extra}")
    return cls(**{n: _typed(doc[n], hints[n], f"{where}.{n}") for n in names})


def _typed(value: Any, tp: Any, where: str) -> Any:
    """`value` (parsed JSON) checked against the annotation `tp`, converted where JSON
    has no such type (a tuple, a dataclass, an error)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _typed(value, option, where)
            except MessageError:
                continue
        raise MessageError(f"{where}: {value!r:.80} is none of {tp}")
    if tp is type(None):
        if value is None:
            return None
    elif isinstance(tp, type) and issubclass(tp, TorchwarmError):
        return _error_from(value, where)
    elif dataclasses.is_dataclass(tp):
        return _dataclass(tp, value, where)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool):
        if isinstance(value, tp):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_typed(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple:
        if isinstance(value, list) and len(value) == len(args):
            return tuple(
                _typed(v, t, f"{where}[{i}]")
                for i, (v, t) in enumerate(zip(value, args, strict=True))
            )
    elif origin is dict:
        if isinstance(value, dict):
            return {_typed(k, args[0], where): _typed(v, args[1], f"{where}.{k}")
                    for k, v in value.items()}  # fmt: skip
    else:
        raise MessageError(f"{where}: no decoder for {tp}")  # a field type this module lacks
    raise MessageError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r:.80}")


# -- the two ends of the pipes ------------------------------------------------------------


def write(fd: int, msg: Message) -> None:
    """Send one message on `fd`, all of it."""
    view = memoryview(encode(msg))
    while view:
        view = view[os.write(fd, view) :]


class Lines:
    """Bytes read from a pipe, as the messages of its complete lines."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, chunk: bytes) -> list[Message]:
        """Decode every line `chunk` completes (MessageError at the first broken one)."""
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [decode(line) for line in lines]


class Channel:
    """The worker's end of the pipes to the gate."""

    def __init__(self, out_fd: int, in_fd: int) -> None:
        self.out = out_fd
        self.inp = in_fd
        self.lines = Lines()

    def send(self, msg: Message) -> None:
        write(self.out, msg)

    def may_commit(self, outcomes: list[WorkloadOutcome], staged: tuple[int, int]) -> bool:
        """Ask the gate whether a swap may start; it answers Go, or kills this process."""
        self.send(MayCommit(outcomes, staged))
        while True:
            chunk = os.read(self.inp, 4096)
            if not chunk:
                return False  # the gate is gone
            got = self.lines.feed(chunk)
            if got:
                return isinstance(got[0], Go)
