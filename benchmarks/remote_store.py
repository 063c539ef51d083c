"""The bag store on object storage: upload (as ingest publishes) and loader throughput.

Runs ``sampleclr-scale bench loader`` against a copy of a local store on an S3 endpoint
on this machine: moto's S3 server in its own process, reached directly and through a
proxy that holds every request back by ``--latency-ms`` (a stand-in for the first-byte
latency of a real object store, tens of ms). Shows what ``LoaderConfig.read_threads``
buys: with one read in flight a worker waits out every round trip; with many, the
latency overlaps.

    python benchmarks/remote_store.py --store bench/store_1000000.zarr \\
        --json benchmarks/results/loader_s3.json

Needs the dev extra (moto's server). Figures on a 2-core machine are bounded by the
single-process Python server; on real S3 the bandwidth per connection is far higher.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

BUCKET = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_s3() -> tuple[subprocess.Popen, int]:
    """moto's S3 server in a child process; its port once it answers."""
    port = _free_port()
    server = subprocess.Popen([shutil.which("moto_server") or "moto_server", "-H",
                               "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return server, port
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("moto_server did not start")


def _start_latency_proxy(target_port: int, latency: float) -> int:
    """A TCP proxy that delays each client-to-server chunk (each request) by ``latency``."""
    port = _free_port()

    async def pipe(reader, writer, delay: float) -> None:
        try:
            while data := await reader.read(1 << 16):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(client_reader, server_writer, latency),
                             pipe(server_reader, client_writer, 0.0),
                             return_exceptions=True)

    async def serve(ready: threading.Event) -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        ready.set()
        async with server:
            await server.serve_forever()

    ready = threading.Event()
    threading.Thread(target=lambda: asyncio.run(serve(ready)), daemon=True).start()
    ready.wait(10)
    return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="local bag store to copy to S3")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--read-threads", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="steady-state seconds per setting")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()

    server, port = _start_s3()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        import fsspec

        from sampleclr_scale.bench.loader import bench_loader
        from sampleclr_scale.storage import staged_output
        from sampleclr_scale.store.bag_store import BAG_STORE

        uri = f"s3://{BUCKET}/{Path(args.store).name}"
        fsspec.filesystem("s3").mkdir(BUCKET)
        size = sum(p.stat().st_size for p in Path(args.store).rglob("*") if p.is_file())
        start = time.perf_counter()
        with staged_output(uri, overwrite=False, kind=BAG_STORE) as staging:  # as ingest
            shutil.copytree(args.store, staging)
        seconds = time.perf_counter() - start
        figures: dict = {"upload": {"mb": round(size / 1e6, 1), "seconds": round(seconds, 2),
                                    "mb_per_s": round(size / 1e6 / seconds, 1)}}
        options = dict(source=None, batch_size=32, cells_per_view=1000,
                       seconds=args.seconds, read_threads=args.read_threads,
                       views=("balanced",), in_memory=False)
        figures["local"] = bench_loader(args.store, **options)
        figures["s3"] = bench_loader(uri, **options)
        proxy = _start_latency_proxy(port, args.latency_ms / 1000)
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy}"  # spawned workers too
        fsspec.filesystem("s3").clear_instance_cache()
        figures[f"s3_plus_{args.latency_ms:g}ms"] = bench_loader(uri, **options)
    finally:
        server.kill()
    figures["latency_ms"] = args.latency_ms
    text = json.dumps(figures, indent=2)
    Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
