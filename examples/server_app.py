"""A model server of the kind a node runs: FastAPI on uvicorn, compiling on its first request.

  GET  /healthz   200 at once, also while the first request compiles
  POST /predict   {"input_ids": [[0 <= id < 1000, ...], ...]} -> {"sum": float}
  GET  /stats     {"counters": {"fxgraph_cache_hit": ..., ...}, "first_call_s": s | null}

The model is a token scorer built in code from a fixed seed (embedding, two linear layers;
nothing downloaded), wrapped in torch.compile at start; torch compiles it lazily, on the
first /predict. It is this small, rather than examples/tiny_hf.py's Llama, because its
cold compile on CPU takes half as long and the server then starts without importing
transformers. After the first request the server prints its counters as one
`torchwarm_report` JSON line (README "Command workloads"), so that a seed running it
records them; /stats gives the same at any time, for a test to prove the first request of
a fresh server hit the cache. `--eager` serves the model uncompiled: the reference sums.

It listens on 127.0.0.1:--port (0: a free port) and prints {"listening": URL} once the
socket accepts connections. SIGTERM stops it the uvicorn way (in-flight requests finish)
and it exits 0. The cache dir comes from TORCHINDUCTOR_CACHE_DIR, as for any app.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
from typing import Annotated, Any

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field, StrictInt
from torch import nn
from torch._dynamo.utils import counters

try:
    from torchwarm.env.compat import COUNTERS
except ImportError:  # an app without torchwarm installed: the groups the report needs
    COUNTERS = {
        "inductor": ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass"),
        "aot_autograd": ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass"),
    }

VOCAB = 1000
SEED = 0
MAX_ROWS, MAX_LEN = 64, 128  # a request bigger than this is refused (422), not computed

TokenId = Annotated[StrictInt, Field(ge=0, lt=VOCAB)]


class PredictIn(BaseModel):
    input_ids: Annotated[
        list[Annotated[list[TokenId], Field(min_length=1, max_length=MAX_LEN)]],
        Field(min_length=1, max_length=MAX_ROWS),
    ]


def scorer() -> nn.Module:
    """Token ids [rows, len] -> one score per token [rows, len, 1], in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = nn.Sequential(
            nn.Embedding(VOCAB, 32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 1)
        )
    return model.eval()


def counter_values() -> dict[str, int]:
    return {n: int(counters[group][n]) for group, names in COUNTERS.items() for n in names}


def make_app(eager: bool) -> FastAPI:
    model = scorer()
    compiled: Any = model if eager else torch.compile(model)
    # One call at a time: the first compiles, and Dynamo compiling one frame from two
    # threads at once is not something to rely on; the counters are then read between
    # calls. The model is tiny, so serving requests one by one costs nothing here.
    lock = threading.Lock()
    first: dict[str, float] = {}
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    # A plain `def`: FastAPI runs it on a worker thread, so the event loop keeps answering
    # /healthz while the first request compiles.
    @app.post("/predict")
    def predict(body: PredictIn) -> dict[str, float]:
        if len({len(row) for row in body.input_ids}) != 1:
            raise HTTPException(422, "input_ids: every row must have the same length")
        ids = torch.tensor(body.input_ids, dtype=torch.int64)
        with lock:
            start = time.perf_counter()
            with torch.no_grad():
                total = float(compiled(ids).double().sum())
            if not first:
                first["first_call_s"] = round(time.perf_counter() - start, 3)
                report = {"counters": counter_values(), **first}
                print(json.dumps({"torchwarm_report": report}), flush=True)
        return {"sum": total}

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        with lock:
            return {"counters": counter_values(), "first_call_s": first.get("first_call_s")}

    return app


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--eager", action="store_true", help="serve the model uncompiled")
    a = p.parse_args()
    # uvicorn catches SIGTERM while it serves and, once shut down, raises it again; this
    # handler turns that (or one arriving before uvicorn started) into exit status 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", a.port))
    except OSError as e:
        print(f"server_app: cannot listen on 127.0.0.1:{a.port}: {e}", file=sys.stderr)
        return 2
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    config = uvicorn.Config(make_app(a.eager), log_level="warning", access_log=False)
    print(json.dumps({"listening": f"http://127.0.0.1:{sock.getsockname()[1]}"}), flush=True)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
