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

Usage: .venv/bin/python benchmarks/gateway_cost.py [--queries 300] [--rounds 3] [--idle 10]
Target (docs/performance.md): gateway CPU per query <= 2 ms on this machine. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
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


DELAY = [0.0]


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
        reply = QueryReply(output=b"\x01" * 64, node="fake", version=1, key_cache="hit", timings={"compute_s": 0.0})
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
    args = p.parse_args()

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
    gateway = None
    stop = threading.Event()
    try:
        redis_child, url = start_redis(supervisor, tmp / "redis", maxmemory_bytes=256 * 1024**2)
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
        port = free_port()
        env = {**os.environ, **settings_env(s)}
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "cipherpool.gateway.app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        gateway = subprocess.Popen(argv, env=env)
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(base + "/v1/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        queues = [model_queue("cpu", model_id), affinity_queue("cpu", model_id, "node-0@test")]
        stopper = threading.Thread(target=fake_node, args=(url, queues, stop), daemon=True)
        stopper.start()
        headers = {"Authorization": f"Bearer {value}"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
            put = c.put(f"/v1/client/keys/{KEY_ID}", content=struct.pack("<II", 0, 4) + b"\x07" * 32)
            assert put.status_code == 201, put.text
            body = EncryptedInput(model_id, KEY_ID, value_ciphertext()).encode()
            post_headers = {"Content-Type": "application/octet-stream"}

            def one() -> float:
                t = time.perf_counter()
                answer = c.post("/v1/queries", params={"wait": args.wait}, content=body, headers=post_headers)
                assert answer.status_code == 200, (answer.status_code, answer.text)
                return time.perf_counter() - t

            for _ in range(50):
                one()  # warm
            DELAY[0] = args.delay
            gateway_ms, redis_ms, medians = [], [], []
            for round_ in range(args.rounds):
                g0, r0 = cpu_s(gateway.pid), cpu_s(redis_child.pid)
                lat = [one() for _ in range(args.queries)]
                g1, r1 = cpu_s(gateway.pid), cpu_s(redis_child.pid)
                n = args.queries
                gateway_ms.append((g1 - g0) / n * 1e3)
                redis_ms.append((r1 - r0) / n * 1e3)
                medians.append(statistics.median(lat) * 1e3)
                print(
                    f"round {round_}: gateway {gateway_ms[-1]:6.2f} ms/q  redis {redis_ms[-1]:6.2f} ms/q  "
                    f"latency median {medians[-1]:6.2f} ms  p95 {sorted(lat)[int(0.95 * n)] * 1e3:6.2f} ms",
                    flush=True,
                )
            print(
                f"median of {args.rounds} rounds: gateway CPU {statistics.median(gateway_ms):.2f} ms per query (target <= 2), "
                f"Redis {statistics.median(redis_ms):.2f} ms, latency {statistics.median(medians):.2f} ms"
            )
            if args.idle:
                i0 = cpu_stat(gateway.pid)
                time.sleep(args.idle)
                print(f"idle: gateway {(cpu_stat(gateway.pid) - i0) / args.idle * 1e3:6.2f} ms of CPU per second", flush=True)
    finally:
        stop.set()
        if gateway is not None:
            gateway.terminate()
            gateway.wait(10)
        supervisor.stop_all(grace_s=5)


if __name__ == "__main__":
    main()
