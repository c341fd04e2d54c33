"""The fail-open / fail-closed decision (`gate._settle`) as a table: what the supervisor
recorded of its worker → each workload's status and reason, `timed_out`, and with
`require` the error raised (class, exit code, message). Pure: no process, no file.

Then the supervisor itself with a real forked worker that writes one broken line: the
gate records it as the pull's fatal error, so it is a row of the table above."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pytest
from factories import minimal_config

from torchwarm import config
from torchwarm.errors import (
    ConfigError,
    DeadlineExceeded,
    InstallError,
    IntegrityError,
    InternalError,
    NoCacheForFingerprint,
    ObjectTooLarge,
    StoreError,
    TorchwarmError,
)
from torchwarm.node import gate
from torchwarm.node import messages as m
from torchwarm.node.gate import Recorded, _settle
from torchwarm.node.report import WorkloadOutcome

DEADLINE_S = 4.0


def warm(name: str) -> WorkloadOutcome:
    return WorkloadOutcome(name, "warm", "", f"{name}/fp", "cachedir", [], 3)


def swap(*names: str) -> m.MayCommit:
    return m.MayCommit([warm(n) for n in names], (1, 2))


def rec(names: tuple[str, ...] = ("mlp",), installed: tuple[str, ...] = (), **kw) -> Recorded:
    return Recorded(list(names), {n: warm(n) for n in installed}, **kw)


@dataclass(frozen=True)
class Row:
    recorded: Recorded
    statuses: dict[str, str]  # fail-open: workload -> warm / cold
    says: str = ""  # fail-open: in each cold workload's reason (or the pull's reason)
    timed_out: bool = False
    raises: type[TorchwarmError] | None = None  # require: the error raised, if any
    exit_code: int = 0
    cold_says: dict[str, str] = field(default_factory=dict)  # per workload, where they differ


NO_CACHE = NoCacheForFingerprint("no cache for workload 'mlp' and this fingerprint")
TOO_LARGE = ObjectTooLarge("blobs/ab/cd", 1024)
BROKEN = m.MessageError("the pull worker sent a line that is not JSON (...)")
KILLED = "killed by signal 9"

TABLE: dict[str, Row] = {
    # -- the worker finished ------------------------------------------------------------
    "done, installed": Row(rec(installed=("mlp",)), {"mlp": "warm"}),
    "done, two installed": Row(rec(("mlp", "cnn"), ("mlp", "cnn")),
                               {"mlp": "warm", "cnn": "warm"}),
    "own failure": Row(rec(failures={"mlp": NO_CACHE}), {"mlp": "cold"}, "no cache for",
                       raises=NoCacheForFingerprint, exit_code=5),
    "own failure, attributes kept": Row(rec(failures={"mlp": TOO_LARGE}), {"mlp": "cold"},
                                        "1024 bytes allowed", raises=ObjectTooLarge,
                                        exit_code=4),
    "fatal": Row(rec(fatal=StoreError("cannot reach the S3 endpoint")), {"mlp": "cold"},
                 "cannot reach", raises=StoreError, exit_code=3),
    "fatal with no workload (selection)": Row(rec((), fatal=ConfigError("no workload 'x'")),
                                              {}, "no workload 'x'", raises=ConfigError,
                                              exit_code=2),
    "no workload, nothing wrong": Row(rec(()), {}),
    "one installed, one failed": Row(rec(("mlp", "cnn"), ("mlp",),
                                         failures={"cnn": IntegrityError("sha256 mismatch")}),
                                     {"mlp": "warm", "cnn": "cold"}, "sha256",
                                     raises=IntegrityError, exit_code=4),
    "own failure beats fatal": Row(rec(failures={"mlp": NO_CACHE}, fatal=StoreError("down")),
                                   {"mlp": "cold"}, "no cache for",
                                   raises=NoCacheForFingerprint, exit_code=5),
    # -- the deadline ---------------------------------------------------------------------
    "deadline before the commit": Row(rec(phase="downloading 'mlp'", deadline_passed=True),
                                      {"mlp": "cold"},
                                      "4 s deadline (it was downloading 'mlp');",
                                      timed_out=True, raises=DeadlineExceeded, exit_code=9),
    "deadline in the swap, not landed": Row(rec(phase="installing mlp", swap=swap("mlp"),
                                                deadline_passed=True),
                                            {"mlp": "cold"}, "during the swap of 'mlp'",
                                            timed_out=True, raises=DeadlineExceeded,
                                            exit_code=9),
    "deadline in the swap, landed": Row(rec(swap=swap("mlp"), swap_landed=True,
                                            deadline_passed=True), {"mlp": "warm"}),
    "installed, then deadline in cleanup": Row(rec(installed=("mlp",), swap=swap("mlp"),
                                                   deadline_passed=True), {"mlp": "warm"}),
    "own failure beats the deadline": Row(rec(failures={"mlp": NO_CACHE},
                                              deadline_passed=True), {"mlp": "cold"},
                                          "no cache for", raises=NoCacheForFingerprint,
                                          exit_code=5),
    "first installed, second hit by the deadline": Row(
        rec(("mlp", "cnn"), ("mlp",), phase="downloading 'cnn'", deadline_passed=True),
        {"mlp": "warm", "cnn": "cold"}, "(it was downloading 'cnn')", timed_out=True,
        raises=DeadlineExceeded, exit_code=9),
    "landed swap covers only its workloads": Row(
        rec(("mlp", "cnn"), swap=swap("mlp"), swap_landed=True, phase="resolving 'cnn'",
            deadline_passed=True),
        {"mlp": "warm", "cnn": "cold"}, "(it was resolving 'cnn')", timed_out=True,
        raises=DeadlineExceeded, exit_code=9),
    "landed swap of two, one reported": Row(rec(("mlp", "cnn"), ("mlp",),
                                                swap=swap("mlp", "cnn"), swap_landed=True,
                                                deadline_passed=True),
                                            {"mlp": "warm", "cnn": "warm"}),
    # -- the worker died ------------------------------------------------------------------
    "crash before the commit": Row(rec(phase="downloading 'mlp'", worker_exit=KILLED),
                                   {"mlp": "cold"},
                                   "the pull worker killed by signal 9 while downloading 'mlp'",
                                   raises=InternalError, exit_code=1),
    "exited without a word": Row(rec(worker_exit="exited with status 70"), {"mlp": "cold"},
                                 "the pull worker exited with status 70 while starting",
                                 raises=InternalError, exit_code=1),
    "stopped with status 0, no report": Row(rec(), {"mlp": "cold"},
                                            "the pull worker stopped while starting",
                                            raises=InternalError, exit_code=1),
    "installed, then crashed in cleanup": Row(rec(installed=("mlp",), worker_exit=KILLED),
                                              {"mlp": "warm"}),
    "killed after the rename, before the report": Row(rec(swap=swap("mlp"), swap_landed=True,
                                                          worker_exit=KILLED),
                                                      {"mlp": "warm"}),
    "swap failed after the rename (fsync)": Row(
        rec(swap=swap("mlp"), swap_landed=True,
            failures={"mlp": InstallError("cannot swap the new cache into /c: I/O error")}),
        {"mlp": "warm"}),
    "swap failed before the rename": Row(
        rec(swap=swap("mlp"), failures={"mlp": InstallError("cannot swap the new cache")}),
        {"mlp": "cold"}, "cannot swap", raises=InstallError, exit_code=6),
    "crash in the swap, not landed": Row(rec(phase="installing mlp", swap=swap("mlp"),
                                             worker_exit=KILLED), {"mlp": "cold"},
                                         "killed by signal 9 while installing mlp",
                                         raises=InternalError, exit_code=1),
    # -- what the gate could not read -------------------------------------------------------
    "broken message": Row(rec(fatal=BROKEN), {"mlp": "cold"}, "not JSON",
                          raises=m.MessageError, exit_code=1),
    "broken message after an install": Row(rec(("mlp", "cnn"), ("mlp",), fatal=BROKEN),
                                           {"mlp": "warm", "cnn": "cold"}, "not JSON",
                                           raises=m.MessageError, exit_code=1),
}  # fmt: skip


@pytest.mark.parametrize("row", TABLE.values(), ids=TABLE.keys())
def test_fail_open(row):
    """Fail-open: never an error; each workload warm or cold with its one-line reason."""
    got = _settle(row.recorded, require=False, deadline_s=DEADLINE_S)
    assert got.error is None
    assert {o.workload: o.status for o in got.outcomes} == row.statuses
    assert [o.workload for o in got.outcomes] == row.recorded.names  # in the config's order
    colds = [o.reason for o in got.outcomes if o.status == "cold"]
    assert all(row.says in r and "\n" not in r for r in colds), colds
    if not row.recorded.names:
        assert row.says in got.reason and (got.reason != "") == bool(row.says)
    assert got.timed_out == row.timed_out


@pytest.mark.parametrize("row", TABLE.values(), ids=TABLE.keys())
def test_fail_closed(row):
    """With require: the error of the first workload that did not install (its own class,
    exit code and attributes), or none when every workload is warm."""
    got = _settle(row.recorded, require=True, deadline_s=DEADLINE_S)
    if row.raises is None:
        assert got.error is None
        assert all(o.status == "warm" for o in got.outcomes)
        return
    assert type(got.error) is row.raises and got.error.exit_code == row.exit_code
    assert row.says in str(got.error)


def test_fail_closed_raises_the_recorded_error_itself():
    """The raised error is the one the worker sent, attributes and all."""
    got = _settle(rec(failures={"mlp": TOO_LARGE}), require=True, deadline_s=DEADLINE_S)
    assert got.error is TOO_LARGE and got.error.limit == 1024


def test_settle_leaves_the_record_as_it_was():
    """Deciding changes nothing it decided from."""
    r = rec(("mlp", "cnn"), ("mlp",), swap=swap("cnn"), swap_landed=True)
    before = repr(r)
    _settle(r, require=False, deadline_s=DEADLINE_S)
    assert repr(r) == before


def test_go_from_the_worker_is_out_of_turn():
    """A message only the gate sends, recorded from the worker, is a MessageError."""
    with pytest.raises(m.MessageError, match="Go out of turn"):
        Recorded(["mlp"]).record(m.Go())


# -- the supervisor, with a forked worker that writes one given line -----------------------


def pull_with_worker_saying(tmp_path, monkeypatch, line: bytes, require: bool):
    """gate.pull() whose worker writes `line` on its pipe and exits 0."""

    def worker(cfg, workloads, require, chan):
        os.write(chan.out, line)
        os._exit(0)

    monkeypatch.setattr(gate, "_worker", worker)
    monkeypatch.chdir(tmp_path)
    cfg = config.load(minimal_config(tmp_path))
    return cfg, lambda: gate.pull(cfg, require=require)


def test_broken_message_starts_cold(tmp_path, monkeypatch):
    """A worker line that is not a message: fail-open writes a cold marker saying so."""
    cfg, pull = pull_with_worker_saying(tmp_path, monkeypatch, b"garbage\n", require=False)
    report = pull()
    assert report.status == "cold"
    (w,) = json.loads(cfg.marker_path.read_text())["workloads"]
    assert w["status"] == "cold" and "not JSON" in w["reason"]


def test_broken_message_with_require_is_exit_1(tmp_path, monkeypatch):
    """The same line with require raises MessageError (exit 1) and writes no marker."""
    cfg, pull = pull_with_worker_saying(tmp_path, monkeypatch, b'{"t": "phase"}\n', True)
    with pytest.raises(m.MessageError, match="fields missing") as info:
        pull()
    assert info.value.exit_code == 1 and not cfg.marker_path.exists()
