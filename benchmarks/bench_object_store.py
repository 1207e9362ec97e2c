"""Loader throughput from an S3 server against local disk, measured in one run.

    python benchmarks/bench_object_store.py [--cells 20000] [--latency-ms 20] [--batches 40]
        [--output benchmarks/results/object_store.json]

A synthetic corpus (gene counts like the shipped rice cells: log-normal, median 500) is built
once locally and once into a bucket of a real S3 server (moto's server mode on a local port).
The trainers' ``BatchStream`` (base config: 64 cells a batch, 1,200 tokens, bucketed) then reads
the same batches from local disk, from the S3 server, and from the S3 server behind a proxy that
holds every request for ``--latency-ms`` (a far object store): cell by cell (``read_block_cells``
1, the default) at read-ahead depths 0, 4 and 16 batches, and with ``read_block_cells`` 64 (the
order shuffles runs of 64 or 256 stored cells; a rank reads 32 steps' cells at once) at depths 0
and 4. Cells/s are compared with local disk and with what one training process
consumes (the pretraining rates in ``results/throughput.json``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BUCKET = "ricefm-bench"
BLOCKS = (1, 64, 256)  # data.read_block_cells: cell by cell (the default), group reads of 64- and 256-cell runs
VARIANTS = [(1, 0), (1, 4), (1, 16), (64, 0), (64, 4), (256, 0), (256, 4)]  # (read_block_cells, prefetch)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def latency_proxy(target_port: int, latency_s: float) -> tuple[ThreadingHTTPServer, int]:
    """An HTTP proxy to 127.0.0.1:target_port that waits ``latency_s`` before every request."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            time.sleep(latency_s)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            conn = http.client.HTTPConnection("127.0.0.1", target_port)
            conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        def log_message(self, *args) -> None:
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address) -> None:
            pass  # a loader process that exits drops its keep-alive connections mid-read

    port = free_port()
    server = Server(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, port


def corpus_h5ad(path: Path, n_cells: int) -> None:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from ricefm.vocab import GeneVocab

    rng = np.random.default_rng(0)
    names = [g for g in GeneVocab.default().as_dict() if not g.startswith("<")]
    genes = [names[i] for i in rng.choice(len(names), 6000, replace=False)]
    n = np.clip(np.round(500 * np.exp(0.5 * rng.standard_normal(n_cells))), 100, 1600).astype(np.int64)
    cols = np.concatenate([np.sort(rng.choice(6000, k, replace=False)) for k in n])
    X = sp.csr_matrix((rng.geometric(0.4, int(n.sum())).astype(np.float32), cols, np.r_[0, np.cumsum(n)]),
                      shape=(n_cells, 6000))
    ad.AnnData(X, var=pd.DataFrame(index=genes)).write_h5ad(path)


def loader_rate(source: str, prefetch: int, batches: int, block: int) -> dict:
    from ricefm.batching import BatchStream, TokenSpec
    from ricefm.shards import ShardedCells

    t0 = time.perf_counter()
    ds = ShardedCells(source)
    opened = time.perf_counter() - t0
    tokens = TokenSpec(ds.vocab.pad_id, ds.vocab.cls_id)
    stream = BatchStream(ds, tokens, 64, 1200, (0.25, 0.5, 0.75), seed=0, prefetch=prefetch, batching="bucketed",
                         n_epochs=1, read_block_cells=block)
    t = time.perf_counter()
    cells = 0
    for i, b in enumerate(stream):
        cells += len(b["cell_index"])
        if i + 1 == batches:
            break
    sec = time.perf_counter() - t
    return {"open_seconds": opened, "seconds": sec, "cells": cells, "cells_per_s": cells / sec}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=20000)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--batches", type=int, default=96, help="timed batches per run (3 read groups of 32)")
    p.add_argument("--output", default=str(REPO / "benchmarks/results/object_store.json"))
    args = p.parse_args()
    import boto3
    from moto.server import ThreadedMotoServer

    from ricefm.atomic import write_json_atomic
    from ricefm.shards.build import build_dataset

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket=BUCKET)
    proxy, proxy_port = latency_proxy(port, args.latency_ms / 1000)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        h5ad = Path(tmp) / "cells.h5ad"
        corpus_h5ad(h5ad, args.cells)
        t = time.perf_counter()
        build_dataset([h5ad], Path(tmp) / "local", progress=False)
        local_build = time.perf_counter() - t
        t = time.perf_counter()
        build_dataset([h5ad], f"s3://{BUCKET}/corpus", progress=False)
        s3_build = time.perf_counter() - t
        sources = {"local": str(Path(tmp) / "local"), "s3": f"s3://{BUCKET}/corpus",
                   f"s3+{args.latency_ms:g}ms": f"s3://{BUCKET}/corpus"}
        for name, src in sources.items():
            endpoint = f"http://127.0.0.1:{proxy_port if '+' in name else port}"
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            for block, prefetch in VARIANTS:
                # each in a fresh process: TensorStore's chunk cache must not serve one run's reads to the next
                with mp.get_context("spawn").Pool(1) as pool:
                    r = pool.apply(loader_rate, (src, prefetch, args.batches, block))
                runs[f"{name}/block{block}/prefetch{prefetch}"] = r
                print(f"{name:12s} read_block_cells {block:2d} prefetch {prefetch:2d}: {r['cells_per_s']:8.0f} cells/s "
                      f"(open {r['open_seconds']:.2f} s)", flush=True)
    proxy.shutdown()
    server.stop()
    consumption = {}
    tp = REPO / "benchmarks/results/throughput.json"
    if tp.is_file():  # what one training process consumes, measured by bench_throughput.py on this machine
        t = json.loads(tp.read_text())
        for backend in ("torch", "jax"):
            run = t["runs"][f"pretrain/shipped/{backend}/bucketed/fast/dropout0.2"]
            consumption[backend] = run["cells_per_s"]
    best = {f"{name}/block{b}": max(runs[f"{name}/block{b}/prefetch{d}"]["cells_per_s"] for bb, d in VARIANTS if bb == b)
            for name in sources for b in BLOCKS}
    ratios = {}
    for name in sources:
        for b in BLOCKS:
            if name != "local":
                ratios[f"{name} block{b} / local block1"] = best[f"{name}/block{b}"] / best["local/block1"]
                ratios[f"{name} block{b} / local block{b}"] = best[f"{name}/block{b}"] / best[f"local/block{b}"]
            for backend, rate in consumption.items():
                ratios[f"{name} block{b} / {backend} training consumption"] = best[f"{name}/block{b}"] / rate
    result = {"benchmark": "object_store_loader", "cells": args.cells, "batch": 64, "max_seq_len": 1200,
              "latency_ms": args.latency_ms, "build_seconds": {"local": local_build, "s3": s3_build},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "runs": runs, "best_cells_per_s": best, "training_cells_per_s": consumption, "ratios": ratios,
              "goal": {"s3 / local": 0.5, "s3 / training consumption": 10.0}}
    write_json_atomic(args.output, result)
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
