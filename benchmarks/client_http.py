"""A client's cost per query call: the transport through httpx against the lean lane.

Both send what a digits query sends (a 1.9 KB ciphertext, ``POST /v1/queries?wait=...``) and
read what it gets back (a 164 KB encrypted output) from a server process that answers at once
(plain asyncio, its own cost the same for both), on one kept connection each. Each request
follows an idle gap (default 20 ms, as a query's calls follow its compute), so the figures are
those of a woken client, not of a hot loop. The two alternate round by round, so the machine's
drift falls on both.

Printed: per request, the client's wall time (median, p95) and CPU (mean), each side and the
ratio lane/httpx. Figures, not assertions.

Usage: .venv/bin/python benchmarks/client_http.py [--requests 300] [--rounds 5] [--gap-ms 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cipherpool.client.transport import Transport
from cipherpool.config.settings import Settings

SERVER = """
import asyncio, sys
BODY = bytes(int(sys.argv[2]))
RESPONSE = (b"HTTP/1.1 200 OK\\r\\ncontent-type: application/octet-stream\\r\\nx-cipherpool-query: q\\r\\n"
            b"content-length: %d\\r\\n\\r\\n" % len(BODY)) + BODY

async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            length = 0
            for line in head.split(b"\\r\\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
            writer.write(RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure(transport: Transport, lane: bool, requests: int, gap_s: float, ciphertext: bytes) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    for _ in range(requests):
        time.sleep(gap_s)
        wall, cpu = time.perf_counter(), time.process_time()
        response = transport.request(
            "POST",
            "/v1/queries",
            content=ciphertext,
            headers={"Content-Type": "application/octet-stream"},
            params={"wait": 25.0},
            timeout=30.0,
            query_path=lane,
        )
        assert len(response.content) > 0
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return walls, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per side per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    parser.add_argument("--input-bytes", type=int, default=1900)
    parser.add_argument("--output-bytes", type=int, default=164283)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as root:
        script = Path(root) / "server.py"
        script.write_text(SERVER)
        server = subprocess.Popen(
            [sys.executable, str(script), str(port), str(args.output_bytes)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            settings = Settings(data_dir=Path(root) / "data", url=f"http://127.0.0.1:{port}")
            transport = Transport(settings, "bench-token", "no credential")
            ciphertext = os.urandom(args.input_bytes)
            figures: dict[bool, tuple[list[float], list[float]]] = {False: ([], []), True: ([], [])}
            for lane in (False, True):
                measure(transport, lane, 20, 0.0, ciphertext)  # connections made, code warm
            for _ in range(args.rounds):
                for lane in (False, True):
                    walls, cpus = measure(transport, lane, args.requests, args.gap_ms / 1e3, ciphertext)
                    figures[lane][0].extend(walls)
                    figures[lane][1].extend(cpus)
            transport.close()
        finally:
            server.terminate()
            server.wait(10)
    print(
        f"client per query call: {args.input_bytes} B up, {args.output_bytes} B back, {args.gap_ms:g} ms idle before each, "
        f"{args.rounds} rounds x {args.requests} requests a side"
    )
    print(f"  {'ms':<18}{'httpx':>10}{'lean lane':>11}{'ratio':>8}")
    rows = {
        "wall p50": lambda values: statistics.median(values),
        "wall p95": lambda values: sorted(values)[int(0.95 * (len(values) - 1))],
    }
    for label, of in rows.items():
        httpx_ms, lane_ms = of(figures[False][0]) * 1e3, of(figures[True][0]) * 1e3
        print(f"  {label:<18}{httpx_ms:10.3f}{lane_ms:11.3f}{lane_ms / httpx_ms:8.2f}x")
    httpx_cpu, lane_cpu = statistics.mean(figures[False][1]) * 1e3, statistics.mean(figures[True][1]) * 1e3
    print(f"  {'CPU mean':<18}{httpx_cpu:10.3f}{lane_cpu:11.3f}{lane_cpu / httpx_cpu:8.2f}x")


if __name__ == "__main__":
    main()
