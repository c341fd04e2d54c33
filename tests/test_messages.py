"""The worker↔gate messages: every one round-trips, errors keep their class and attributes,
and anything else on the pipe is a MessageError that says what was wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torchwarm.errors import (
    InstallError,
    InternalError,
    NoCacheForFingerprint,
    ObjectTooLarge,
    TorchwarmError,
)
from torchwarm.node import messages as m
from torchwarm.node.report import WorkloadOutcome

OUTCOME = WorkloadOutcome("mlp", "warm", "", "mlp/abc", "cachedir",
                          [{"role": "cachedir", "sha256": "ab" * 32, "size": 3}], 3,
                          {"counters": {"fxgraph_cache_hit": 2}}, precompiled=True)  # fmt: skip

PLAIN = [
    m.Phase("downloading 'mlp'"),
    m.Fingerprinted("c80ca6", 0.25),
    m.Timing("fetch_s.mlp", 1.5),
    m.MayCommit([OUTCOME], (2049, 123456)),
    m.Go(),
    m.Installed(OUTCOME),
    m.Done(),
]


@pytest.mark.parametrize("msg", PLAIN, ids=lambda msg: type(msg).__name__)
def test_every_message_round_trips(msg):
    """decode(encode(msg)) is equal to msg, one line with its newline."""
    line = m.encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert m.decode(line) == msg


def round_trip(error: TorchwarmError) -> TorchwarmError:
    got = m.decode(m.encode(m.Failed("mlp", error)))
    assert isinstance(got, m.Failed) and got.workload == "mlp"
    return got.error


def test_error_keeps_its_class_message_and_attributes():
    """ObjectTooLarge arrives as ObjectTooLarge with where, limit, version and exit code."""
    sent = ObjectTooLarge("manifests/mlp/abc.json", 1024, "v7")
    got = round_trip(sent)
    assert type(got) is ObjectTooLarge and got.exit_code == 4
    assert (got.where, got.limit, got.version) == ("manifests/mlp/abc.json", 1024, "v7")
    assert str(got) == str(sent)


def test_instance_exit_code_round_trips():
    """An exit code set on the instance (not the class) arrives with it."""
    sent = InternalError("boom")
    sent.exit_code = 7
    got = round_trip(sent)
    assert type(got) is InternalError and got.exit_code == 7


def test_error_class_outside_errors_module_round_trips():
    """A TorchwarmError defined in another torchwarm module (MessageError) is found there."""
    got = round_trip(m.MessageError("garbled"))
    assert type(got) is m.MessageError and got.exit_code == 1


def test_error_message_arrives_on_one_line():
    """An SDK's multi-line message is one line once it has crossed the pipe."""
    got = round_trip(NoCacheForFingerprint("no cache\n  for mlp"))
    assert str(got) == "no cache for mlp" and got.exit_code == 5


def test_attribute_json_cannot_hold_arrives_as_text():
    """An attribute JSON cannot hold (a Path) arrives as its str(), the rest as it was."""
    sent = InstallError("full")
    sent.path = Path("/var/cache/x")  # type: ignore[attr-defined]
    assert round_trip(sent).path == "/var/cache/x"  # type: ignore[attr-defined]


def test_fatal_round_trips():
    """Fatal carries its error's class."""
    got = m.decode(m.encode(m.Fatal(InstallError("disk"))))
    assert isinstance(got, m.Fatal) and type(got.error) is InstallError


def test_as_error_keeps_torchwarm_errors():
    """A TorchwarmError is reported as itself."""
    e = NoCacheForFingerprint("none")
    assert m.as_error(e) is e


def test_as_error_makes_an_oserror_an_install_error():
    """An OSError of this node's disk is an InstallError naming the file."""
    e = m.as_error(OSError(28, "No space left on device", "/cache/x"))
    assert type(e) is InstallError and e.exit_code == 6
    assert str(e) == "I/O error on this node: No space left on device (/cache/x)"


def test_as_error_makes_anything_else_an_internal_error():
    """Any other exception is an InternalError that says it is a bug."""
    e = m.as_error(RuntimeError("oops\nsecond line"))
    assert type(e) is InternalError and e.exit_code == 1
    assert str(e) == "internal error: RuntimeError: oops second line (a bug)"


def doc(**fields) -> bytes:
    return json.dumps(fields).encode()


ERR = {"class": "torchwarm.errors:InstallError", "message": "x", "attrs": {}}
OUT = json.loads(m.encode(m.Installed(OUTCOME)))["outcome"]

BROKEN = {
    "not JSON": (b'{"t": "phase", "pha', "not JSON"),
    "not an object": (b"[1, 2]", "unknown message"),
    "unknown tag": (doc(t="hello"), "unknown message 'hello'"),
    "no tag": (doc(phase="x"), "unknown message None"),
    "missing field": (doc(t="timing", name="x"), "fields missing ['seconds']"),
    "extra field": (doc(t="phase", phase="x", extra=1), "unexpected ['extra']"),
    "wrong type": (doc(t="timing", name="x", seconds="soon"), "timing.seconds: expected float"),
    "bool for a number": (doc(t="timing", name="x", seconds=True), "expected float"),
    "short tuple": (doc(t="commit?", outcomes=[], staged=[1]), "commit?.staged"),
    "outcome's extra key": (doc(t="installed", outcome={**OUT, "x": 1}), "unexpected ['x']"),
    "outcome's wrong type": (doc(t="installed", outcome={**OUT, "bytes": "3"}), "outcome.bytes"),
    "not an error class": (doc(t="fatal", error={**ERR, "class": "builtins:ValueError"}),
                           "'builtins:ValueError' is not a torchwarm error class"),
    "not a class": (doc(t="fatal", error={**ERR, "class": "torchwarm.errors:one_line"}),
                    "is not a torchwarm error class"),
    "no such class": (doc(t="fatal", error={**ERR, "class": "torchwarm.errors:Nope"}),
                      "is not a torchwarm error class"),
    "error without attrs": (doc(t="fatal", error={"class": ERR["class"], "message": "x"}),
                            "exactly class, message and attrs"),
}  # fmt: skip


@pytest.mark.parametrize("line, says", BROKEN.values(), ids=BROKEN.keys())
def test_broken_line_is_a_message_error_that_says_what(line, says):
    """Each way a line can be wrong is a MessageError (exit 1) naming what was wrong."""
    with pytest.raises(m.MessageError) as info:
        m.decode(line)
    assert says in str(info.value) and info.value.exit_code == 1


def test_lines_decode_only_complete_lines():
    """A message split across reads is decoded once its newline has arrived."""
    line = m.encode(m.Phase("x"))
    lines = m.Lines()
    assert lines.feed(line[:5]) == []
    assert lines.feed(line[5:] + m.encode(m.Done())) == [m.Phase("x"), m.Done()]
