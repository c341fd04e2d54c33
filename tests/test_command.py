"""Command workloads without torch: config, warm-up key, the warm-up process (its
environment, failure, timeout), a second cache root under cache_dir from seed to node
and into `torchwarm run`, and what ls, probe and the manifest say.

The command is tests/cmd_app.py, an "app" that keeps an entry in a cache root of its
own ($APP_CACHE_ROOT); every claim about a seed, node or app is made in a new process.
The hit of a real compile is in test_command_node.py.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import torchwarm
from factories import alive

from torchwarm import config
from torchwarm.errors import ConfigError
from torchwarm.seed.warmup import warmup_key
from torchwarm.spec import signing

APP = Path(__file__).with_name("cmd_app.py")
REPO = Path(__file__).resolve().parent.parent
ROOT_ENV = {"APP_CACHE_ROOT": "{cache_dir}/app"}  # the second cache root, under cache_dir


def app(name: str = "app", *args: str, **extra: Any) -> dict[str, Any]:
    """A workload running cmd_app.py with `args`."""
    return {"name": name, "command": [sys.executable, str(APP), *args], "code": [str(APP)],
            **extra}  # fmt: skip


def setup(folder: Path, workloads: list[dict[str, Any]], **top: Any) -> Path:
    """A config in `folder`: local store `store/`, cache_dir `node/inductor`."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"store": "store", "cache_dir": "node/inductor", "workloads": workloads, **top}
    path = folder / "torchwarm.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def load_error(path: Path, **overrides: Any) -> str:
    with pytest.raises(ConfigError) as e:
        config.load(path, overrides, environ={})
    assert "\n" not in str(e.value)
    return str(e.value)


# -- config -------------------------------------------------------------------------------


def test_command_workload_parses(tmp_path):
    """command, cwd (relative to the config file), env (integers as written) and code."""
    (tmp_path / "app").mkdir()
    path = setup(tmp_path, [{"name": "srv", "command": ["python", "warm.py"], "cwd": "app",
                             "env": {"REQUESTS": 3}, "code": ["app/warm.py", "app"]}],
                 env=ROOT_ENV)  # fmt: skip
    cfg = config.load(path, environ={})
    (w,) = cfg.workloads
    assert w.model is None and w.inputs == () and w.command is not None
    assert w.command.argv == ("python", "warm.py")
    assert w.command.cwd == tmp_path / "app"
    assert w.command.env == {"REQUESTS": "3"}
    assert w.command.code == (tmp_path / "app" / "warm.py", tmp_path / "app")
    assert cfg.env == ROOT_ENV  # kept unexpanded: the seed and the node expand it


def test_command_cwd_defaults_to_the_config_folder(tmp_path):
    """Without cwd a command runs where the config file is, wherever torchwarm was started."""
    (w,) = config.load(setup(tmp_path, [app()]), environ={}).workloads
    assert w.command is not None and w.command.cwd == tmp_path


def test_example_command_config_loads():
    """The shipped configs/example-command.yaml is a command workload whose script exists."""
    cfg = config.load(REPO / "configs" / "example-command.yaml", environ={})
    (w,) = cfg.workloads
    assert w.command is not None and cfg.format == "cachedir"
    assert all(p.is_file() for p in w.command.code)
    assert (w.command.cwd / w.command.argv[1]).is_file()


@pytest.mark.parametrize(
    ("workload", "top", "expected"),
    [
        ({"name": "a", "model": "m:f", "command": ["x"]}, {},
         "workloads[0] sets both model and command"),
        ({"name": "a"}, {}, "workloads[0].model is required (or command"),
        ({"name": "a", "command": "python warm.py"}, {},
         "workloads[0].command must be a non-empty list of argument strings, run without a shell"),
        ({"name": "a", "command": []}, {}, "workloads[0].command must be a non-empty list"),
        ({"name": "a", "command": ["x"], "inputs": [[{"shape": [1]}]]}, {},
         "workloads[0].inputs applies to model workloads only"),
        ({"name": "a", "model": "m:f", "inputs": [[{"shape": [1]}]], "code": ["x"]}, {},
         "workloads[0].code applies to command workloads only"),
        ({"name": "a", "command": ["x"], "env": {"TORCHWARM_SIGNING_KEY": "k"}}, {},
         "workloads[0].env.TORCHWARM_SIGNING_KEY is torchwarm's own"),
        ({"name": "a", "command": ["x"]}, {"env": {"TORCHINDUCTOR_CACHE_DIR": "/c"}},
         "env.TORCHINDUCTOR_CACHE_DIR is set by torchwarm"),
        ({"name": "a", "command": ["x"]}, {"env": {"TRITON_CACHE_DIR": "/t"}},
         "env.TRITON_CACHE_DIR is left unset by torchwarm"),
        ({"name": "a", "command": ["x"], "env": {"VLLM_CACHE_ROOT": "{cache_dir}/vllm"}}, {},
         "workloads[0].env.VLLM_CACHE_ROOT uses {cache_dir}, but a workload's env reaches "
         "only its warm-up"),
        ({"name": "a", "command": ["x"], "env": {"FLAG": True}}, {},
         "workloads[0].env.FLAG is True; expected a string (quote it in the YAML)"),
        ({"name": "a", "command": ["x"]}, {"env": {"1BAD": "x"}}, "env.1BAD is not a variable"),
        ({"name": "a", "command": ["x"], "code": "warm.py"}, {},
         "workloads[0].code must be a list of files or folders"),
        ({"name": "a", "command": ["x"]}, {"format": "megacache"},
         "format is 'megacache', but workloads[0] ('a') is a command workload, which can "
         "only be captured as cachedir"),
    ],
)  # fmt: skip
def test_command_config_errors_name_the_key(tmp_path, workload, top, expected):
    """Each mistake is one line naming the file and the key path."""
    path = setup(tmp_path, [workload], **top)
    msg = load_error(path)
    assert msg.startswith(f"{path}: ") and expected in msg, msg


def test_format_flag_refused_for_a_command_workload(tmp_path):
    """`warmup --format megacache` on a command workload is refused at load, naming the flag."""
    msg = load_error(setup(tmp_path, [app()]), format="megacache")
    assert "format (from the command line) is 'megacache'" in msg


# -- warm-up key --------------------------------------------------------------------------


def test_warmup_key_covers_command_env_and_code(tmp_path):
    """The daemon's key changes with the argv, a workload env value, the top-level env and
    the content of a code file or folder; not with the timeout."""
    code = tmp_path / "src"
    (code / "pkg").mkdir(parents=True)
    (code / "pkg" / "warm.py").write_text("print(1)\n")
    path = setup(tmp_path, [app("a", code=[str(code)], env={"N": "1"})])
    (w,) = config.load(path, environ={}).workloads
    assert w.command is not None

    def key(w: Any = w, env: dict[str, str] | None = None) -> str:
        return warmup_key(w, "cachedir", "0" * 32, env)

    first = key()
    assert key(replace(w, warmup_timeout_s=5)) == first
    assert key(replace(w, command=replace(w.command, argv=(*w.command.argv, "--more")))) != first
    assert key(replace(w, command=replace(w.command, env={"N": "2"}))) != first
    assert key(env=ROOT_ENV) != first
    (code / "pkg" / "warm.py").write_text("print(2)\n")
    edited = key()
    assert edited != first
    (code / "pkg" / "new.py").write_text("")
    assert key() != edited


def test_warmup_key_names_a_missing_code_path(tmp_path):
    """A code path that does not exist is a one-line ConfigError naming it."""
    (w,) = config.load(setup(tmp_path, [app(code=["gone.py"])]), environ={}).workloads
    with pytest.raises(ConfigError, match=f"code path {tmp_path / 'gone.py'} does not exist"):
        warmup_key(w, "cachedir", "0" * 32)


# -- the report line ----------------------------------------------------------------------


def test_report_line_is_read_strictly(tmp_path):
    """The last `torchwarm_report` line counts; unknown names and ill-typed values are
    dropped; a broken line is skipped; no line gives None."""
    from torchwarm.seed import processes as command

    log = tmp_path / "log"
    log.write_text("no report here\n")
    assert command.read_report(log) is None
    good = {"counters": {"fxgraph_cache_hit": 2, "fxgraph_cache_miss": 0, "made_up": 5,
                         "autograd_cache_hit": "2", "autograd_cache_miss": -1},
            "first_call_s": 1.23456}  # fmt: skip
    log.write_text(
        json.dumps({"torchwarm_report": {"counters": {"fxgraph_cache_hit": 9}}}) + "\n"
        + json.dumps({"torchwarm_report": good}) + "\n"
        + '{"torchwarm_report": {"counters": {"fxgraph_cache_hit": 1}\n'  # cut short
        + "server stopped\n"
    )  # fmt: skip
    assert command.read_report(log) == {
        "counters": {"fxgraph_cache_hit": 2, "fxgraph_cache_miss": 0},
        "first_call_s": 1.235,
    }


# -- seed → store → node → app (a module seed, pushed once) -------------------------------


SECRET_VALUE = "warm-only-value-not-for-manifests"


@dataclass
class Seeded:
    root: Path
    secret: str  # the signing key the seed held

    config = property(lambda self: self.root / "torchwarm.yaml")
    out = property(lambda self: self.root / "out" / "app")  # the warm-up's folder
    cache_dir = property(lambda self: self.root / "node" / "inductor")  # where it compiled
    spy = property(lambda self: self.root / "spy.json")  # what the command saw


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    """One `warmup --push` of cmd_app.py (spying on its own environment), with the second
    cache root in the top-level env and a warm-up-only variable in the workload's, from a
    seed whose environment holds a signing key and variables torchwarm must not pass."""
    secret, _ = signing.generate("seed-1")
    s = Seeded(tmp_path_factory.mktemp("cmdseed"), secret)
    setup(s.root, [app("app", "--spy", str(s.spy), env={"WARM_ONLY": SECRET_VALUE})],
          env=ROOT_ENV)  # fmt: skip
    env = {"TORCHWARM_SIGNING_KEY": secret, "TRITON_CACHE_DIR": str(s.root / "triton"),
           "TORCH_CACHING_PRECOMPILE": "1"}  # fmt: skip
    proc = torchwarm("warmup", "-c", str(s.config), "--push", "--out", str(s.out.parent), env=env)
    assert "the command reported no counters" in proc.stdout
    return s


def test_command_runs_with_the_cache_env_and_no_torchwarm_variable(seeded):
    """The command sees the config's cache_dir (the node's path, lent to the warm-up), the
    second root inside it, its own env, the config folder as cwd; no TORCHWARM_* variable
    nor the key's text, no TRITON_CACHE_DIR, no TORCH_CACHING_PRECOMPILE."""
    seen = json.loads(seeded.spy.read_text())
    env = seen["env"]
    cache = seeded.cache_dir
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(cache)
    assert env["APP_CACHE_ROOT"] == str(cache / "app")
    assert env["WARM_ONLY"] == SECRET_VALUE
    assert not [k for k in env if k.startswith("TORCHWARM_")]
    key_text = seeded.secret.split(":", 1)[1]
    assert not [k for k, v in env.items() if key_text in v]
    assert "TRITON_CACHE_DIR" not in env and "TORCH_CACHING_PRECOMPILE" not in env
    assert seen["cwd"] == str(seeded.root)


def test_second_cache_root_travels_and_installs_under_cache_dir(seeded, tmp_path):
    """A fresh node's pull installs the entry the seed's command wrote into its second
    cache root, under the node's cache_dir, in the same tree as torch's cache."""
    node = tmp_path / "node" / "inductor"
    out = torchwarm("pull", "-c", str(seeded.config), "--cache-dir", str(node), "--require")
    assert "warm: app" in out.stdout
    entry = json.loads((node / "app" / "entry.json").read_text())
    assert entry == {"written_in": str(seeded.cache_dir / "app")}  # the seed's own write


def test_run_gives_the_app_the_second_root_in_the_node_cache_dir(seeded, tmp_path):
    """`torchwarm run` sets the top-level env for the app, {cache_dir} being the node's
    cache dir, so the app finds the seed's entry there; a workload's env stays the
    warm-up's."""
    node = tmp_path / "node" / "inductor"
    proc = torchwarm("run", "-c", str(seeded.config), "--cache-dir", str(node), "--",
                     sys.executable, str(APP))  # fmt: skip
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["env"] == {"APP_CACHE_ROOT": str(node / "app"),
                             "TORCHINDUCTOR_CACHE_DIR": str(node),
                             "TRITON_CACHE_DIR": None, "WARM_ONLY": None}  # fmt: skip
    assert report["found"] == {"written_in": str(seeded.cache_dir / "app")}


def test_manifest_summary_of_a_command_is_honest(seeded):
    """The manifest's warmup names the command and its variables (not their values), its
    run time; no counters, since the command printed none."""
    (path,) = (seeded.root / "store" / "manifests").rglob("*.json")
    text = path.read_text()
    summary = json.loads(text)["warmup"]
    assert summary["command"] == [sys.executable, str(APP), "--spy", str(seeded.spy)]
    assert summary["env"] == ["APP_CACHE_ROOT", "WARM_ONLY"]
    assert SECRET_VALUE not in text
    assert "counters" not in summary and "first_call_s" not in summary
    assert "input_sets" not in summary and summary["wall_s"] > 0
    assert summary["so_files"] == 0 and summary["unpacked_bytes"] > 0


def test_ls_shows_the_command_and_no_made_up_counters(seeded):
    """ls: the command in place of input sets, '-' for graphs; --json: counters null."""
    out = torchwarm("ls", "-c", str(seeded.config)).stdout.splitlines()
    row = out[1].split()
    assert row[0] == "app" and row[6] == "-" and row[7] == "seed"
    assert row[8:10] == ["command:", sys.executable]
    (doc,) = [json.loads(line) for line in torchwarm("ls", "-c", str(seeded.config),
                                                     "--json").stdout.splitlines()]  # fmt: skip
    assert doc["counters"] is None and doc["command"][0] == sys.executable


def test_probe_of_a_command_without_report_says_hits_are_unknown(seeded, tmp_path):
    """probe runs the command against the cache dir and, with no report line, says so."""
    node = tmp_path / "node" / "inductor"
    out = torchwarm("probe", "-c", str(seeded.config), "--cache-dir", str(node)).stdout
    assert "printed no torchwarm_report line, so its hits are unknown" in out
    doc = json.loads(torchwarm("probe", "-c", str(seeded.config), "--cache-dir", str(node),
                               "--json").stdout)  # fmt: skip
    assert doc["counters"] is None and doc["cache_dir"] == str(node)


# -- failures -----------------------------------------------------------------------------


def test_failing_command_exits_7_naming_its_log(tmp_path):
    """A command that exits non-zero: `warmup` exits 7, one line with the exit status, its
    last output and the log, which stays."""
    path = setup(tmp_path, [app("bad", "--fail")])
    proc = torchwarm("warmup", "-c", str(path), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 7, proc.stderr
    (line,) = proc.stderr.splitlines()
    log = tmp_path / "out" / "bad" / "warmup.log"
    assert "warm-up of 'bad' (command " in line
    assert "failed (exit 3): boom: the warm-up request failed" in line
    assert line.endswith(f"(full log: {log})") and "compiling..." in log.read_text()


def test_command_past_its_timeout_is_killed_with_its_children(tmp_path):
    """warmup_timeout_s kills the command and the process it started; exit 7, one line."""
    pids = tmp_path / "pids.json"
    path = setup(tmp_path, [app("hang", "--hang", str(pids), warmup_timeout_s=3)])
    t0 = time.monotonic()
    proc = torchwarm("warmup", "-c", str(path), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 7, proc.stderr
    assert 3 <= time.monotonic() - t0 < 60
    (line,) = proc.stderr.splitlines()
    assert "warm-up of 'hang' (command " in line
    assert "did not finish within 3 s (warmup_timeout_s); killed it and its child processes; " \
           "last output: waiting for a request that never comes" in line  # fmt: skip
    started = json.loads(pids.read_text())
    assert not alive(started["child"]) and not alive(started["grandchild"]), started


def test_command_that_cannot_start_exits_2(tmp_path):
    """No such program: exit 2, one line naming the workload and the program."""
    path = setup(tmp_path, [{"name": "gone", "command": ["torchwarm-no-such-program"]}])
    proc = torchwarm("warmup", "-c", str(path), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert "workload 'gone': cannot start 'torchwarm-no-such-program'" in line


def test_env_that_changes_the_fingerprint_is_refused(tmp_path):
    """OMP_NUM_THREADS in env would give the capture a fingerprint no node pulls with
    (the pull reads its own environment): exit 2 before anything runs, naming the field."""
    spy = tmp_path / "spy.json"
    path = setup(tmp_path, [app("a", "--spy", str(spy))], env={**ROOT_ENV, "OMP_NUM_THREADS": "3"})
    proc = torchwarm("warmup", "-c", str(path), "--out", str(tmp_path / "out"), check=False,
                     env={"OMP_NUM_THREADS": "2"})  # fmt: skip
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert "workload 'a': env sets OMP_NUM_THREADS, which changes fingerprint field(s) " \
           "threads" in line  # fmt: skip
    assert not spy.exists()


def test_env_is_checked_without_computing_the_fingerprint_per_variable(tmp_path, monkeypatch):
    """A config with many env variables computes the fingerprint at most once before the
    refusal (each computation may start torch for the GPUs), and still names the field."""
    from torchwarm.env import fingerprint
    from torchwarm.seed import warmup

    calls = []
    real = fingerprint.collect
    monkeypatch.setattr(fingerprint, "collect", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    many = {f"APP_SETTING_{i}": str(i) for i in range(20)}
    path = setup(tmp_path, [app("a")], env={**ROOT_ENV, **many, "OMP_NUM_THREADS": "3"})
    cfg = config.load(path, environ={})
    with pytest.raises(ConfigError) as e:
        warmup.warmup(cfg, cfg.workloads[0], tmp_path / "out")
    assert str(e.value) == (
        "workload 'a': env sets OMP_NUM_THREADS, which changes fingerprint field(s) threads; "
        "a node reads those from the environment torchwarm runs in, never from env: set "
        "OMP_NUM_THREADS there (seed and node), not in env"
    )
    assert len(calls) <= 1, len(calls)


def test_daemon_skips_an_unchanged_command_and_rewarms_after_a_code_edit(tmp_path):
    """daemon --once: warms, then skips (no run), then warms again once a file in `code`
    changed."""
    warm = tmp_path / "warm.txt"
    warm.write_text("requests: 3\n")
    spy = tmp_path / "spy.json"
    path = setup(tmp_path, [app("a", "--spy", str(spy), code=[str(APP), "warm.txt"])],
                 env=ROOT_ENV)  # fmt: skip

    def once() -> list[str]:
        spy.unlink(missing_ok=True)
        out = torchwarm("daemon", "-c", str(path), "--once").stdout
        return [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]

    assert "published" in once() and spy.exists()
    assert "skipped_present" in once() and not spy.exists()
    warm.write_text("requests: 4\n")
    assert "published" in once() and spy.exists()


def test_placeholder_expands_per_side(tmp_path):
    """torchenv.cache_env: {cache_dir} is the given cache dir; torch's variables are set
    after `extra`, so nothing in env overrides them."""
    from torchwarm.env import torchenv

    env = torchenv.cache_env(tmp_path / "c", base={"TRITON_CACHE_DIR": "/t", "KEEP": "1"},
                             extra={"A": "{cache_dir}/a:{cache_dir}/b", "B": "plain"})  # fmt: skip
    assert env == {"KEEP": "1", "A": f"{tmp_path}/c/a:{tmp_path}/c/b", "B": "plain",
                   "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "c")}  # fmt: skip
