"""A server for the server-workload tests (test_server_workload.py), stdlib only, no torch.

    python server_fake.py --port N [options]

It listens on 127.0.0.1:N and prints "listening on 127.0.0.1:N" then, once healthy,
"ready to serve" (both flushed). Until healthy every request answers 503; then GET
/healthz answers 200 and any other request --status, with a small JSON body. It records
what it was asked (--record) and the stop signals it got (SIGTERM, SIGINT), after which
it dies of that signal (exit -15, -2) unless --on-stop says otherwise. Options:
  --listen-after S           bind only after S seconds
  --healthy-after S          healthy S seconds after the start (inf: never)
  --status CODE              what requests other than /healthz answer (default 200)
  --exit-before-ready CODE   print two lines and exit CODE at once, never listening
  --crash-on-request         exit 5 on the first request other than /healthz, unanswered
  --answer-after S           wait S seconds before answering a request other than /healthz
  --record FILE              append JSON lines: {"pid"} at the start, one
                             {"method", "path", "json", "status"} per request other than
                             /healthz, {"signal"} per stop signal
  --cache                    each request writes $TORCHINDUCTOR_CACHE_DIR/fake/request-N.json
                             (so that the capture has content)
  --on-stop CODE             on a stop signal, exit CODE instead of dying of it
  --ignore-term              ignore SIGTERM, start a grandchild that sleeps, write both
                             pids to --pids FILE
  --linger FILE              start a worker (same process group) that, 1 s after this
                             process exits, writes FILE and exits
  --drip-healthz             once healthy, /healthz answers 200 with a chunked body of
                             one byte a second (for a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

START = time.monotonic()
# The --linger worker: argv = [parent pid, file]; waits for its parent to exit.
LINGER = """
import os, sys, time
while os.getppid() == int(sys.argv[1]):
    time.sleep(0.05)
time.sleep(1.0)
with open(sys.argv[2], "w") as f:
    f.write("flushed\\n")
"""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--listen-after", type=float, default=0.0)
    p.add_argument("--healthy-after", type=float, default=0.0)
    p.add_argument("--status", type=int, default=200)
    p.add_argument("--exit-before-ready", type=int)
    p.add_argument("--crash-on-request", action="store_true")
    p.add_argument("--answer-after", type=float, default=0.0)
    p.add_argument("--record")
    p.add_argument("--cache", action="store_true")
    p.add_argument("--on-stop", type=int)
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--pids")
    p.add_argument("--linger")
    p.add_argument("--drip-healthz", action="store_true")
    a = p.parse_args(argv)

    lock = threading.Lock()

    def record(doc: dict[str, Any]) -> None:
        if a.record:
            with lock, open(a.record, "a") as f:
                f.write(json.dumps(doc) + "\n")

    record({"pid": os.getpid()})
    if a.exit_before_ready is not None:
        print("loading weights", flush=True)
        print("RuntimeError: out of memory", flush=True)
        return a.exit_before_ready

    def stopped(signum: int, _frame: object) -> None:
        record({"signal": signal.Signals(signum).name})
        if a.on_stop is not None:
            os._exit(a.on_stop)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGINT, stopped)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if a.ignore_term else stopped)
    if a.ignore_term:
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(a.pids + ".tmp", "w") as f:
            json.dump({"child": os.getpid(), "grandchild": grandchild.pid}, f)
        os.rename(a.pids + ".tmp", a.pids)

    if a.linger:
        # A worker flushing after its server exits: it gets no signal of its own.
        subprocess.Popen([sys.executable, "-c", LINGER, str(os.getpid()), a.linger])

    served = [0]

    def healthy() -> bool:
        return time.monotonic() - START >= a.healthy_after

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            if self.path == "/healthz":
                if a.drip_healthz and healthy():
                    self._drip()
                    return
                self._send(200 if healthy() else 503)
                return
            if a.crash_on_request:
                print("Segmentation fault in the model", flush=True)
                os._exit(5)
            time.sleep(a.answer_after)
            status = a.status if healthy() else 503
            with lock:
                served[0] += 1
                n = served[0]
            if a.cache:
                root = os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "fake")
                os.makedirs(root, exist_ok=True)
                with open(os.path.join(root, f"request-{n}.json"), "w") as f:
                    json.dump(body, f)
            record({"method": method, "path": self.path, "json": body, "status": status})
            self._send(status)

        def _send(self, status: int) -> None:
            data = json.dumps({"ok": status < 400}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _drip(self) -> None:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(60):
                self.wfile.write(b"1\r\nx\r\n")
                self.wfile.flush()
                time.sleep(1.0)
            self.wfile.write(b"0\r\n\r\n")

        def do_GET(self) -> None:  # noqa: N802 (http.server's names)
            self._answer("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._answer("POST")

    time.sleep(a.listen_after)
    httpd = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    print(f"listening on 127.0.0.1:{a.port}", flush=True)

    def say_ready() -> None:
        time.sleep(max(0.0, a.healthy_after - (time.monotonic() - START)))
        print("ready to serve", flush=True)

    if a.healthy_after != float("inf"):
        threading.Thread(target=say_ready, daemon=True).start()
    httpd.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
