"""The gateway's own cost per query (issue 27, "a leaner gateway"): CPU of the gateway process
and of Redis per ``POST /v1/queries?wait=S`` answered in that one request, and its latency.

What runs: a real redis-server, a real gateway process (uvicorn, the platform's settings, a
SQLite database with one account, model, token and key set), and, in this process, a stand-in
node that answers each query the moment it is published (it pops the message from the model's
queue or the node's affinity queue and stores and publishes a reply, as a node's Celery does),
so no FHE runs and every figure is the platform's. CPU is read from /proc (every thread of
the process) before and after each round of ``--queries`` sequential queries; each
round prints gateway and Redis CPU per query and the latency median and p95; ``--idle`` then
measures the gateway's CPU per second with no traffic (its background work).

With ``--other PATH`` (another checkout, e.g. ``git worktree add /tmp/before HEAD~1``), a second
gateway runs that checkout's code on the same Redis and database, and the rounds alternate
between the two in blocks (this, other, other, this, ...): each side's CPU is read over its own
blocks only, and the ratio is printed per round. On this machine, whose speed drifts 2-3x
within minutes, one run after another cannot resolve a 10 % change; blocks side by side can.

Usage: .venv/bin/python benchmarks/gateway_cost.py [--queries 300] [--rounds 3] [--idle 10] [--other PATH]
Target (docs/performance.md): gateway CPU per query <= 2 ms on this machine. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import msgpack
import redis

KEY_ID = "cd" * 16
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers, when run as a script


def cpu_stat(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """CPU seconds of every thread of a process, those that ended included (/proc/<pid>/stat,
    in ticks of 10 ms: a round wants some hundred queries). Summing the live threads'
    schedstat lost the thread pool's idle workers that ended meanwhile (a round read negative)."""
    return cpu_stat(pid)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(env: dict[str, str], tree: Path | None) -> tuple[subprocess.Popen[bytes], str]:
    """A gateway process of this checkout's code, or of ``tree``'s (its package first on the path)."""
    port = free_port()
    if tree is not None:
        env = {**env, "PYTHONPATH": str(tree.resolve())}
    argv = [sys.executable, "-m", "uvicorn", "--factory", "cipherpool.gateway.app:create_app"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(argv, env=env, cwd=tree)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(base + "/v1/health").status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the gateway of {tree or 'this checkout'} did not start")


class Side:
    """One gateway's rounds: its CPU and Redis's are read over its own blocks only."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], base: str, headers: dict[str, str], body: bytes, wait: float):
        self.name, self.proc, self.body, self.wait = name, proc, body, wait
        self.client = httpx.Client(base_url=base, headers=headers, timeout=30)
        self.gateway_ms: list[float] = []
        self.redis_ms: list[float] = []
        self.medians: list[float] = []
        self.p95s: list[float] = []

    def one(self) -> float:
        t = time.perf_counter()
        answer = self.client.post("/v1/queries", params={"wait": self.wait}, content=self.body, headers=POST_HEADERS)
        assert answer.status_code == 200, (answer.status_code, answer.text)
        return time.perf_counter() - t

    def round(self, n: int, redis_pid: int) -> None:
        g0, r0 = cpu_s(self.proc.pid), cpu_s(redis_pid)
        lat = sorted(self.one() for _ in range(n))
        g1, r1 = cpu_s(self.proc.pid), cpu_s(redis_pid)
        self.gateway_ms.append((g1 - g0) / n * 1e3)
        self.redis_ms.append((r1 - r0) / n * 1e3)
        self.medians.append(statistics.median(lat) * 1e3)
        self.p95s.append(lat[int(0.95 * n)] * 1e3)


DELAY = [0.0]
OUTPUT_BYTES = [64]
POST_HEADERS = {"Content-Type": "application/octet-stream"}


def fake_node(url: str, queues: list[str], stop: threading.Event) -> None:
    from cipherpool.messages import QueryReply

    r = redis.Redis.from_url(url)
    while not stop.is_set():
        try:
            got = r.brpop(queues, timeout=1)
        except redis.RedisError:
            return
        if not got:
            continue
        message = json.loads(got[1])
        time.sleep(DELAY[0])
        task_id = message["headers"]["id"]
        reply = QueryReply(output=b"\x01" * OUTPUT_BYTES[0], node="fake", version=1, key_cache="hit", timings={"compute_s": 0.0})
        meta = {
            "status": "SUCCESS",
            "result": {"ok": True, "value": reply.encode()},
            "task_id": task_id,
            "traceback": None,
            "children": [],
            "date_done": None,
        }
        raw = msgpack.packb(meta, use_bin_type=True)
        key = "celery-task-meta-" + task_id
        pipe = r.pipeline(transaction=False)
        pipe.set(key, raw, ex=300)
        pipe.publish(key, raw)
        pipe.execute()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--rate", type=float, default=0, help="token and account rate (0: unlimited)")
    p.add_argument("--no-affinity", action="store_true", help="key affinity off (CIPHERPOOL_KEY_AFFINITY=false)")
    p.add_argument("--quota", type=int, default=None)
    p.add_argument("--wait", type=float, default=5)
    p.add_argument("--rounds", type=int, default=3)
    # (a fake node answers at once: --delay holds each answer that long, as a slow model would)
    p.add_argument("--idle", type=float, default=0.0, help="then measure the gateway idle this long")
    p.add_argument("--delay", type=float, default=0.0, help="the fake node's compute, seconds")
    p.add_argument("--output-bytes", type=int, default=64, help="each answer's size (digits: 164283)")
    p.add_argument("--other", type=Path, default=None, help="another checkout: its gateway alternates with this one's")
    args = p.parse_args()
    OUTPUT_BYTES[0] = args.output_bytes

    from cipherpool.config.settings import Settings, settings_env
    from cipherpool.db import init_db, session_scope
    from cipherpool.db.tables import ModelStatus
    from cipherpool.fhe.deployment import Versions
    from cipherpool.messages import EncryptedInput
    from cipherpool.names import affinity_queue, model_queue
    from cipherpool.services import accounts, models, nodes, tokens, workers
    from cipherpool.stack.redis_server import start_redis
    from cipherpool.stack.supervisor import Supervisor
    from cipherpool.store import BlobKind, BlobStore
    from tests.helpers import value_ciphertext, versions_json, zip_bytes

    tmp = Path(tempfile.mkdtemp(prefix="gwbench-"))
    supervisor = Supervisor(tmp / "logs")
    gateway = other = None
    stop = threading.Event()
    try:
        redis_child, url = start_redis(supervisor, tmp / "redis", maxmemory_bytes=2 * 1024**3)  # answers kept 300 s
        s = Settings(
            data_dir=tmp / "data",
            broker_url=url,
            token_rate_per_s=args.rate,
            account_rate_per_s=args.rate,
            key_affinity=not args.no_affinity,
        )
        db = s.effective_database_url()
        init_db(db)
        store = BlobStore.from_url(url)
        client_zip = zip_bytes({"client.specs.json": "{}", "serialized_processing.json": "{}", "versions.json": versions_json()})
        server_zip = zip_bytes({"versions.json": versions_json()})
        blobs = store.put(BlobKind.CLIENT_ZIP, client_zip), store.put(BlobKind.SERVER_ZIP, server_zip)
        art = models.Artifact(blobs[0], blobs[1], len(client_zip), len(server_zip), Versions.installed())
        with session_scope(db) as session:
            alice, _ = accounts.create_account(session, "alice")
            model_id = models.deploy_model(session, alice, "digits", art).id
            models.set_status(session, alice, "digits", ModelStatus.ACTIVE)
            token, value = tokens.create_token(session, alice, "t", "digits", quota=args.quota)
            nodes.register_node(session, "node-0@test", nodes.NodeInfo(host_class="cpu", concurrency=1, threads=None, pid=1))
            session.flush()
            worker = workers.start_worker(session, alice, "digits", s.node_heartbeat_s)
            workers.mark_running(session, worker.id, {1})
            workers.set_consuming(session, worker.id, True)
        env = {**os.environ, **settings_env(s)}
        gateway, base = start_gateway(env, None)
        other = start_gateway(env, args.other) if args.other else None
        queues = [model_queue("cpu", model_id), affinity_queue("cpu", model_id, "node-0@test")]
        stopper = threading.Thread(target=fake_node, args=(url, queues, stop), daemon=True)
        stopper.start()
        headers = {"Authorization": f"Bearer {value}"}
        body = EncryptedInput(model_id, KEY_ID, value_ciphertext()).encode()
        sides = [Side("this", gateway, base, headers, body, args.wait)]
        if other is not None:
            sides.append(Side("other", other[0], other[1], headers, body, args.wait))
        put = sides[0].client.put(f"/v1/client/keys/{KEY_ID}", content=struct.pack("<II", 0, 4) + b"\x07" * 32)
        assert put.status_code == 201, put.text
        for side in sides:
            for _ in range(50):
                side.one()  # warm
        DELAY[0] = args.delay
        for round_ in range(args.rounds):
            order = sides if round_ % 2 == 0 else sides[::-1]  # ABBA: neither side always goes first
            for side in order:
                side.round(args.queries, redis_child.pid)
            print(
                f"round {round_}: "
                + "  |  ".join(
                    f"{side.name}: gateway {side.gateway_ms[-1]:6.2f} ms/q  redis {side.redis_ms[-1]:5.2f} ms/q  "
                    f"latency median {side.medians[-1]:6.2f} ms  p95 {side.p95s[-1]:6.2f} ms"
                    for side in sides
                )
                + (f"  |  ratio {sides[0].gateway_ms[-1] / sides[1].gateway_ms[-1]:.2f}x" if other else ""),
                flush=True,
            )
        for side in sides:
            print(
                f"{side.name}: median of {args.rounds} rounds: gateway CPU {statistics.median(side.gateway_ms):.2f} ms per query "
                f"(target <= 2), Redis {statistics.median(side.redis_ms):.2f} ms, "
                f"latency {statistics.median(side.medians):.2f} ms"
            )
        if other is not None:
            ratios = [a / b for a, b in zip(sides[0].gateway_ms, sides[1].gateway_ms)]
            print(f"gateway CPU this/other, median of the rounds' ratios: {statistics.median(ratios):.2f}x")
        if args.idle:
            i0 = cpu_stat(gateway.pid)
            time.sleep(args.idle)
            print(f"idle: gateway {(cpu_stat(gateway.pid) - i0) / args.idle * 1e3:6.2f} ms of CPU per second", flush=True)
        for side in sides:
            side.client.close()
    finally:
        stop.set()
        for proc in (gateway, other[0] if other else None):
            if proc is not None:
                proc.terminate()
                proc.wait(10)
        supervisor.stop_all(grace_s=5)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
