"""The probe/metrics endpoint and the pull deadline setting, without compiling anything."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from factories import minimal_config

from torchwarm import config as cfgmod
from torchwarm.errors import ConfigError
from torchwarm.util import httpd


def test_metric_renders_prometheus_text():
    """A family renders HELP, TYPE and one escaped, sorted-label line per sample."""
    text = httpd.metric("x_total", "counter", "things", [({"w": 'a"b', "k": "z"}, 2.0)])
    assert text == '# HELP x_total things\n# TYPE x_total counter\nx_total{k="z",w="a\\"b"} 2\n'


def test_metric_without_labels():
    """A sample without labels is the bare name and value."""
    assert httpd.metric("up", "gauge", "h", [({}, 1.0)]).endswith("\nup 1\n")


@pytest.mark.parametrize("bad", ["8477", "host:", "host:99999", "a:b"])
def test_listen_must_be_host_port(bad):
    """A --listen value that is not HOST:PORT is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="HOST:PORT"):
        httpd.parse_listen(bad)


def test_routes_answer_and_unknown_paths_404():
    """Served routes answer with their status and body; anything else is 404."""
    server = httpd.serve("127.0.0.1:0", {"/readyz": lambda: (503, httpd.TEXT, b"not ready\n")})
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{base}/readyz")
        assert e.value.code == 503 and e.value.read() == b"not ready\n"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{base}/nope")
        assert e.value.code == 404
    finally:
        server.shutdown()


def test_deadline_defaults_and_overrides(tmp_path):
    """deadline_s defaults to 300 s; YAML, then TORCHWARM_DEADLINE_S, then the flag win."""
    path = minimal_config(tmp_path)
    assert cfgmod.load(path, environ={}).deadline_s == 300.0
    assert cfgmod.load(path, environ={"TORCHWARM_DEADLINE_S": "12.5"}).deadline_s == 12.5
    got = cfgmod.load(path, {"deadline_s": 3}, environ={"TORCHWARM_DEADLINE_S": "12"})
    assert got.deadline_s == 3


@pytest.mark.parametrize("bad", ["0", "-1", "soon", "nan", "inf"])
def test_deadline_must_be_positive_seconds(tmp_path, bad):
    """A deadline that is not a positive number of seconds names its variable."""
    with pytest.raises(ConfigError, match=r"deadline_s \(from \$TORCHWARM_DEADLINE_S\)"):
        cfgmod.load(minimal_config(tmp_path), environ={"TORCHWARM_DEADLINE_S": bad})


def test_a_prober_that_hangs_up_early_leaves_no_traceback(capfd):
    """A client that resets the connection before the answer (a probe past its timeout)
    costs the endpoint nothing, and its log gets no traceback."""
    import socket
    import struct
    import time

    answered = []

    def slow() -> httpd.Response:
        time.sleep(0.3)  # the client is gone by now
        answered.append(True)
        return 200, httpd.TEXT, b"x" * 65536

    server = httpd.serve("127.0.0.1:0", {"/slow": slow, "/ok": lambda: (200, httpd.TEXT, b"ok\n")})
    try:
        port = server.server_address[1]
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # RST
        deadline = time.monotonic() + 5
        while len(answered) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ok", timeout=5) as r:
            assert r.read() == b"ok\n"
    finally:
        server.shutdown()
    err = capfd.readouterr().err
    assert len(answered) == 3
    assert "Traceback" not in err and "Exception occurred" not in err, err
