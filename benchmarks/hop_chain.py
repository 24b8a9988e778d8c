"""The least a query's path can cost here: the platform's process hops made by the smallest
Python that makes them, timed around a stand-in compute (issue 27).

A query crosses client -> gateway (HTTP) -> Redis (a push) -> the node's consumer (its BRPOP)
-> the node's pool thread -> Redis (the answer, published) -> gateway -> client. Here each of
those processes does only that, with the libraries the platform is built on and nothing else:

* the gateway: an ``asyncio.Protocol`` (no uvicorn, no Starlette, no FastAPI, no guard, no
  accounting) that pushes each request's body with ``redis.asyncio`` and answers it from one
  pub/sub reader;
* four nodes, queries alternating between them:
  * ``bare``: a ``BRPOP`` loop (redis-py) that hands each message to one thread through a
    ``queue.Queue``, as Celery's thread pool does;
  * ``celery``: a real ``celery worker -P threads -c 1`` with the platform's message settings
    (its Redis transport, late acks, msgpack: ``cipherpool/config/celery.py``) and nothing
    else of it (no STARTED, no events, no result backend), its message pushed as the
    transport carries it. The platform's node is this plus what it adds;
  * ``stock``: the same worker on Celery's and kombu's defaults (early acks, kombu's
    transport, JSON);
  * ``no-copy``: ``stock`` without kombu's unacknowledged copy (``ack_emulation`` off), which
    the platform cannot drop: a dead node's queries are restored from it;
  the task "computes" (spins one core, as a node of one thread does) and publishes the answer;
* the client: one kept socket, the request in one ``sendall``, the answer read by
  ``http.client``, as the client's lean lane does.

The sizes are a digits query's (1.9 KB up, 164 KB back). Each query's time beyond its compute is
split at the compute's start and end (``time.perf_counter`` is one clock for every process):
*before* (client to the task's first line) and *after* (the compute's end to the client holding
the answer). After a compute of seconds that is the floor under the platform's "end to end less
compute" (`path_ab.py`): no code on the same processes goes below the ``bare`` figure, and none
keeping a Celery worker and its unacknowledged copies below the ``celery`` one. The machine's
speed drifts by a few tenths of a millisecond between runs, so ``--repeat`` measures again on
the same processes.

``--platform digits`` also starts the platform itself (an embedded stack, one node of one
thread: `path_ab.py`'s driver) and puts one real query in each round of the longest compute,
so that the platform's "end to end less compute" and its ratio to the ``celery`` floor come
from one run. Give a compute near the model's (digits: about 2 s).

Usage: .venv/bin/python benchmarks/hop_chain.py [--rounds 12] [--computes 0,0.02,2] [--repeat 3]
[--platform digits]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import multiprocessing
import multiprocessing.synchronize
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import redis
import redis.asyncio as aioredis
from celery import Celery

from cipherpool.config.celery import ONE_CLIENT_REDIS_TRANSPORT

sys.path.insert(0, str(Path(__file__).resolve().parent))
import path_ab  # noqa: E402 - beside this file: the platform's driver (--platform)

UP_BYTES = 1_900  # a digits ciphertext
DOWN_BYTES = 164_283  # a digits answer
ID_BYTES = 16
SPEC_BYTES = 16  # "no-copy:2.0", padded
STAMP_BYTES = 20  # the compute's start and end, each as text
BARE_QUEUE = "hop-chain-bare"
CELERY_QUEUE = "hop-chain-celery"
ANSWERS = "hop-chain-answers"
PLATFORM = {  # cipherpool/config/celery.py's settings for a query's message
    "broker_transport": ONE_CLIENT_REDIS_TRANSPORT,
    "task_acks_late": True,
    "task_serializer": "msgpack",
    "accept_content": ["msgpack", "json"],
}
CELERY_NODES: dict[str, dict[str, object]] = {  # a Celery node's name -> its settings
    "celery": PLATFORM,
    "stock": {},
    "no-copy": {"broker_transport_options": {"ack_emulation": False}},
}
NODES = ("bare", *CELERY_NODES)

NODE = os.environ.get("HOP_CHAIN_NODE", "celery")  # in a Celery node's process: which one it is
app = Celery("hop_chain", broker=os.environ.get("HOP_CHAIN_REDIS", "redis://127.0.0.1:6379/15"))
app.conf.update(worker_prefetch_multiplier=1, worker_hijack_root_logger=False, **CELERY_NODES.get(NODE, {}))
_publisher: list[redis.Redis] = []


def compute_and_answer(publisher: redis.Redis, query_id: bytes, seconds: float) -> None:
    """The stand-in compute (one core spun), then the answer published with its stamps."""
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        pass
    ended = time.perf_counter()
    stamps = f"{started:<{STAMP_BYTES}.9f}{ended:<{STAMP_BYTES}.9f}".encode()
    publisher.publish(ANSWERS, query_id + stamps + b"a" * DOWN_BYTES)


@app.task(name="hop_chain.compute", ignore_result=True)
def compute(query_id: str, seconds: float, ciphertext: str) -> None:
    if not _publisher:
        _publisher.append(redis.Redis.from_url(app.conf.broker_url))
    compute_and_answer(_publisher[0], query_id.encode(), seconds)


def bare_node(url: str, ready: multiprocessing.synchronize.Event) -> None:
    """A consumer thread's BRPOP and hand-over to one pool thread."""
    consumer = redis.Redis.from_url(url)
    publisher = redis.Redis.from_url(url)
    handed: queue.Queue[bytes] = queue.Queue()

    def pool_thread() -> None:
        while True:
            message = handed.get()
            spec = message[ID_BYTES : ID_BYTES + SPEC_BYTES].decode()
            compute_and_answer(publisher, message[:ID_BYTES], float(spec.split(":")[1]))

    threading.Thread(target=pool_thread, daemon=True).start()
    consumer.ping()
    publisher.ping()
    ready.set()
    while True:
        try:
            popped = consumer.brpop([BARE_QUEUE], timeout=1)
        except redis.TimeoutError:  # redis-py's socket timeout on a long wait: wait again
            continue
        if popped is not None:
            handed.put(popped[1])


def celery_queue(node: str) -> str:
    return f"{CELERY_QUEUE}-{node}"


def celery_message(node: str, query_id: str, seconds: float, ciphertext: str) -> bytes:
    """The message a Redis transport carries for ``compute`` (protocol 2), in the node's
    serializer."""
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    if CELERY_NODES[node].get("task_serializer") == "msgpack":
        body = msgpack.packb([[query_id, seconds, ciphertext], {}, embed], use_bin_type=True)
        content_type, encoding = "application/x-msgpack", "binary"
    else:
        body = json.dumps([[query_id, seconds, ciphertext], {}, embed]).encode()
        content_type, encoding = "application/json", "utf-8"
    task_id = str(uuid.uuid4())
    headers = {
        "lang": "py", "task": "hop_chain.compute", "id": task_id, "root_id": task_id, "parent_id": None,
        "group": None, "shadow": None, "eta": None, "expires": None, "retries": 0, "timelimit": [None, None],
        "argsrepr": "", "kwargsrepr": "", "origin": "gateway", "ignore_result": True,
    }  # fmt: skip
    properties = {
        "correlation_id": task_id, "reply_to": "", "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
        "delivery_info": {"exchange": "", "routing_key": celery_queue(node)}, "delivery_tag": str(uuid.uuid4()),
    }  # fmt: skip
    return json.dumps(
        {"body": base64.b64encode(body).decode(), "content-encoding": encoding,
         "content-type": content_type, "headers": headers, "properties": properties}
    ).encode()  # fmt: skip


def gateway(url: str, port: int, ready: multiprocessing.synchronize.Event) -> None:
    asyncio.run(_gateway(url, port, ready))


async def _gateway(url: str, port: int, ready: multiprocessing.synchronize.Event) -> None:
    """HTTP in, a push to Redis, the answer's message out: nothing else on the way."""
    loop = asyncio.get_running_loop()
    client = aioredis.Redis.from_url(url)
    waiting: dict[bytes, asyncio.Future[bytes]] = {}

    async def as_received(message: object) -> object:
        return message

    subscriber = client.pubsub(push_handler_func=as_received)
    await subscriber.subscribe(ANSWERS)
    await subscriber.get_message(timeout=1)

    async def read_answers() -> None:
        while True:
            message = await subscriber.get_message(timeout=None)
            if message is not None and message["type"] == "message":
                data = message["data"]
                future = waiting.pop(data[:ID_BYTES], None)
                if future is not None and not future.done():
                    future.set_result(data[ID_BYTES:])

    class Http(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            if len(self.buffer) < end + 4 + length:
                return
            body, self.buffer = self.buffer[end + 4 : end + 4 + length], self.buffer[end + 4 + length :]
            loop.create_task(self.answer(body))

        async def answer(self, body: bytes) -> None:
            future: asyncio.Future[bytes] = loop.create_future()
            query_id, spec = body[:ID_BYTES], body[ID_BYTES : ID_BYTES + SPEC_BYTES].decode().strip()
            waiting[query_id] = future
            node, seconds = spec.split(":")
            if node == "bare":
                await client.lpush(BARE_QUEUE, body)
            else:
                ciphertext = body[ID_BYTES + SPEC_BYTES :].decode()
                message = celery_message(node, query_id.decode(), float(seconds), ciphertext)
                await client.lpush(celery_queue(node), message)
            data = await future
            stamps, payload = data[: 2 * STAMP_BYTES], data[2 * STAMP_BYTES :]
            head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nx-stamps: %s\r\n\r\n" % (len(payload), stamps)
            self.transport.write(head + payload)  # type: ignore[attr-defined]

    reader = loop.create_task(read_answers())
    server = await loop.create_server(Http, "127.0.0.1", port)
    ready.set()
    async with server:
        await reader


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def query(sock: socket.socket, node: str, seconds: float) -> tuple[float, float]:
    """One query's time before its compute and after it, in seconds."""
    spec = f"{node}:{seconds}".encode().ljust(SPEC_BYTES)
    body = os.urandom(ID_BYTES // 2).hex().encode() + spec + b"c" * UP_BYTES
    request = b"POST /v1/queries HTTP/1.1\r\nhost: gateway\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    sent = time.perf_counter()
    sock.sendall(request)
    response = http.client.HTTPResponse(sock)
    response.begin()
    payload = response.read()
    received = time.perf_counter()
    assert len(payload) == DOWN_BYTES, len(payload)
    stamps = response.getheader("x-stamps") or ""
    started, ended = float(stamps[:STAMP_BYTES]), float(stamps[STAMP_BYTES:])
    return started - sent, received - ended


def start_celery(url: str, node: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HOP_CHAIN_REDIS": url, "HOP_CHAIN_NODE": node, "PYTHONPATH": str(Path(__file__).parent)}
    argv = [sys.executable, "-m", "celery", "-A", "hop_chain", "worker", "-P", "threads", "-c", "1", "-n", f"{node}@%h"]
    argv += ["-Q", celery_queue(node), "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"]
    return subprocess.Popen(argv, env=env)


def measure(sock: socket.socket, seconds: float, rounds: int, between: float, platform: Any = None) -> str:
    """One line: each node's medians before and after the compute, and of their sum; with a
    platform driver, a second line: the platform's queries, one a round, and their ratio."""
    spent: dict[str, list[tuple[float, float]]] = {node: [] for node in NODES}
    real: list[dict[str, float]] = []
    for _ in range(rounds):
        for node in NODES:
            time.sleep(between)
            spent[node].append(query(sock, node, seconds))
        if platform is not None:
            time.sleep(between)
            real.append(path_ab.ask(platform))
    cells = []
    for node in NODES:
        before = statistics.median(b for b, _ in spent[node]) * 1e3
        after = statistics.median(a for _, a in spent[node]) * 1e3
        total = sorted((b + a) * 1e3 for b, a in spent[node])
        p95 = total[round(0.95 * (len(total) - 1))]
        cells.append(f"{node:>7}: {before:4.2f} + {after:4.2f} = {statistics.median(total):4.2f} (p95 {p95:4.2f})")
    line = f"compute {seconds:4.2f} s  " + "  ".join(cells)
    if real:
        less = sorted((f["e2e"] - f["compute"]) * 1e3 for f in real)
        floor = statistics.median(sum(pair) for pair in spent["celery"]) * 1e3
        p50, p95 = statistics.median(less), less[round(0.95 * (len(less) - 1))]
        compute = statistics.median(f["compute"] for f in real)
        line += (
            f"\n    the platform: end to end less compute {p50:4.2f} ms (p95 {p95:4.2f}), its compute {compute:4.2f} s;"
            f" {p50 / floor:4.2f}x the celery node's"
        )
    return line


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--computes", default="0,0.02,2", help="stand-in compute, seconds, comma-separated")
    parser.add_argument("--between", type=float, default=0.02, help="the client's pause between queries (its decrypt, encrypt)")
    parser.add_argument("--repeat", type=int, default=1, help="measure every compute this many times")
    parser.add_argument("--platform", choices=["digits", "cancer"], help="also the platform's own queries of this model")
    args = parser.parse_args()
    computes = [float(c) for c in args.computes.split(",")]
    from cipherpool.stack.redis_server import start_redis
    from cipherpool.stack.supervisor import Supervisor

    root = Path(tempfile.mkdtemp(prefix="hop-chain-"))
    supervisor = Supervisor(root / "logs")
    spawn = multiprocessing.get_context("spawn")
    children: list[multiprocessing.process.BaseProcess] = []
    workers: list[subprocess.Popen[bytes]] = []
    driver = None
    try:
        if args.platform:  # first: its stack trains and compiles the model meanwhile
            driver = path_ab.start(Path(__file__).resolve().parents[1], args.platform)
        _child, url = start_redis(supervisor, root / "redis")
        port = free_port()
        for target, extra in ((bare_node, ()), (gateway, (port,))):
            ready = spawn.Event()
            child = spawn.Process(target=target, args=(url, *extra, ready), daemon=True)
            child.start()
            children.append(child)
            if not ready.wait(30):
                raise SystemExit(f"{target.__name__} did not start")
        workers = [start_celery(url, node) for node in CELERY_NODES]
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(20):  # every code path run once before timing (a worker's first query waits for it)
            for node in NODES:
                query(sock, node, 0.0)
        if driver is not None:
            path_ab.ready(driver)
        print("end to end less compute, ms: medians of before + after = their sum's median (its p95)")
        for repeat in range(args.repeat):
            for seconds in computes:
                platform = driver if seconds == max(computes) else None
                print(f"[{repeat + 1}] " + measure(sock, seconds, args.rounds, args.between, platform), flush=True)
        sock.close()
    finally:
        if driver is not None and driver.stdin is not None:
            driver.stdin.close()
            driver.wait(60)
        for worker in workers:
            worker.terminate()
            worker.wait(10)
        for child in children:
            child.terminate()
            child.join(5)
        supervisor.stop_all(grace_s=5)


if __name__ == "__main__":
    main()
