"""Query latency and throughput: in process vs through the platform (gateway, Redis, nodes).

Prints, in one run:
  * digits MLP: FHEModelServer.run in this process with a cached (deserialized once)
    evaluation key, and with the key deserialized on every call;
  * the platform's end-to-end `execute` latency through the HTTP gateway, a real Redis and a
    real pool node, and its ratio to the in-process run (target <= 1.02x), the two alternating
    query by query (so that the machine's drift falls on both);
  * the overhead per query: end to end minus the node's own compute for the same query;
  * CPU per query of each process on the path (gateway, node, client, Redis), from the
    kernel's counters around the same queries (issue 27's target: gateway <= 2 ms);
  * a management round trip through the gateway, and the node's resident memory;
  * breast-cancer logistic regression (6-30 ms per run): queries/s with all queries in flight
    at once through a pool of as many nodes as cores, against in-process runs from as many
    threads as cores (target >= 0.5x).

Usage: .venv/bin/python benchmarks/query_latency.py [--queries 20] [--throughput 300]
(``--throughput 0``: the latency figures alone.)
Figures, not assertions: targets live in docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def row(label: str, values: list[float]) -> str:
    ms = [v * 1e3 for v in values]
    return f"  {label:<44} median {statistics.median(ms):8.1f} ms   p95 {pct(ms, 0.95):8.1f} ms   (n={len(ms)})"


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads, those that ended included
    (``/proc/<pid>/stat``; in clock ticks of 10 ms, so a figure per query wants some dozens of
    queries). Summing ``/proc/<pid>/task/*/schedstat`` instead would lose the threads that ended
    meanwhile (a thread pool's idle workers): measured negative."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_row(label: str, seconds: float, n: int) -> str:
    return f"  {label:<44} {seconds / n * 1e3:8.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--throughput", type=int, default=300, help="queries for the throughput figure (0: skip it)")
    args = parser.parse_args()
    n = max(20, args.queries)
    root = Path(tempfile.mkdtemp(prefix="cipherpool-bench-"))
    tempfile.tempdir = str(root)  # concrete's compile directories go here, removed at the end
    try:
        run(root, n)
        if args.throughput > 0:
            throughput(root, max(50, args.throughput))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, n: int) -> None:
    # In-process runs sleep OpenMP's idle threads at once, as pool nodes do (CIPHERPOOL_NODE_SPIN_MS,
    # 0): with libomp's 200 ms they would spin into the platform query that follows each of them.
    # Read when concrete's runtime starts, so set before it is imported.
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    from concrete import fhe
    from concrete.ml.deployment import FHEModelClient, FHEModelServer

    from cipherpool.client import ManagementClient, QueryClient
    from cipherpool.config.settings import Settings
    from cipherpool.examples import train_digits
    from cipherpool.fhe.process import after_fhe
    from cipherpool.stack.embedded import EmbeddedStack, StackOptions

    print(f"cipherpool benchmark: digits MLP, {os.cpu_count()} cores, {n} queries per figure")
    example = train_digits(root / "digits")
    x = example.x_test[0].reshape(1, -1)

    server = FHEModelServer(str(example.path))
    client = FHEModelClient(str(example.path), key_dir=str(root / "bench-keys"))
    key_bytes = client.get_serialized_evaluation_keys()
    ciphertext = client.quantize_encrypt_serialize(x)
    keys = fhe.EvaluationKeys.deserialize(key_bytes)
    server.run(ciphertext, keys)  # warm-up
    after_fhe()  # SIGPIPE and the exit status back from concrete's runtime (cipherpool/fhe/process.py)
    per_call = timed(lambda: server.run(ciphertext, key_bytes), min(n, PER_CALL_RUNS))
    deserialize = timed(lambda: fhe.EvaluationKeys.deserialize(key_bytes), 5)

    # With an in-process run between them, the client's queries come every ~2 s, past the
    # credential cache's default 2 s TTL: every request would load its credential on its path
    # (4-8 ms), as any client's does that queries less often (docs/performance.md). The cache at
    # its longest, 5 s, keeps this figure the path's own.
    settings = Settings(data_dir=root / "platform", node_threads=os.cpu_count(), auth_cache_ttl_s=5.0, **UNLIMITED)
    options = StackOptions(nodes=1, node_concurrency=1, beat=False, flower=False, loglevel="WARNING")
    with EmbeddedStack(settings, options) as stack:
        mc = ManagementClient(stack.create_account("bench"), settings=stack.client_settings)
        mc.deploy_model("digits", example.path)
        mc.activate_model("digits")
        t = time.perf_counter()
        mc.start_worker("digits")
        bind_s = time.perf_counter() - t
        qc = QueryClient(mc.create_token("bench", model="digits"), settings=stack.client_settings, key_dir=root / "client")
        qc.generate_keys()
        qc.upload_evaluation_keys()
        encrypted = qc.encrypt(x[0])
        first = timed(lambda: qc.execute(encrypted), 1)  # key fetched and deserialized on the node
        end_to_end, compute, waits, served = [], [], [], []
        pids = {c.name: c.pid for c in stack.supervisor.children}
        watched = {"gateway": pids["gateway"], "node": pids["node1"], "Redis": pids.get("redis")}
        idle_from = cpu_s(watched["gateway"])
        time.sleep(IDLE_S)  # the gateway's own background (its timers, heartbeat, flushes), apart
        idle_per_s = (cpu_s(watched["gateway"]) - idle_from) / IDLE_S
        loop_started = time.perf_counter()
        cpu_before = {name: cpu_s(pid) for name, pid in watched.items() if pid is not None}
        client_cpu, cached = 0.0, []
        # In process and through the platform alternate, query by query: this machine's speed
        # drifts over minutes by more than the 2 % the ratio is judged by (in-process runs of
        # the same query, measured apart, read 806-980 ms within an hour), so each platform
        # query is compared with the in-process run just before it.
        for _ in range(n):
            t = time.perf_counter()
            server.run(ciphertext, keys)
            cached.append(time.perf_counter() - t)
            c = time.thread_time()  # the client's calls run on this thread
            t = time.perf_counter()
            qc.execute(encrypted)
            end_to_end.append(time.perf_counter() - t)
            client_cpu += time.thread_time() - c
            compute.append(qc.last_timings["compute_s"])
            waits.append(qc.last_timings["queue_wait_s"])
            served.append(qc.last_timings.get("server_total_s", compute[-1]))
        cpu = {name: cpu_s(watched[name]) - before for name, before in cpu_before.items()}
        cpu["client"] = client_cpu
        loop_s = time.perf_counter() - loop_started
        floor = timed(mc.list_models, n)
        node_pid = next(c.pid for c in stack.supervisor.children if c.name == "node1")
        node_rss = rss_mb(node_pid)
        qc.close()
        mc.close()

    in_process = statistics.median(cached)
    print()
    print("in process (FHEModelServer.run):")
    print(row("cached deserialized key (between the queries)", cached))
    print(row("key deserialized per call", per_call))
    print(row("EvaluationKeys.deserialize alone", deserialize))
    print(f"  speed-up of the cache: {statistics.median(per_call) / in_process:.2f}x")
    print()
    print(f"through the platform (HTTP gateway, real Redis, one pool node, threads={os.cpu_count()}):")
    print(f"  worker start (bind + model load)             {bind_s * 1e3:8.1f} ms")
    print(f"  first query (key fetched + deserialized)     {first[0] * 1e3:8.1f} ms")
    print(row("execute, end to end (cached key)", end_to_end))
    print(row("node compute (same queries)", compute))
    print(row("queue wait (same queries)", waits))
    print(row("management round trip (gateway + database)", floor))
    print()
    print("overhead:")
    print(f"  end to end / in process (medians)            {statistics.median(end_to_end) / in_process:8.3f} x")
    print(f"  end to end / in process (p95s)               {pct(end_to_end, 0.95) / pct(cached, 0.95):8.3f} x")
    pairs = [e / c for e, c in zip(end_to_end, cached)]
    print(f"  each query / the run just before it, median  {statistics.median(pairs):8.3f} x")
    print(f"  end to end - in process (medians)            {(statistics.median(end_to_end) - in_process) * 1e3:8.1f} ms")
    print(row("end to end - node compute, per query", [e - c for e, c in zip(end_to_end, compute)]))
    # Where that goes: the node's own work around the compute (decode, key, result), and what is
    # neither the node's nor the queue's (client, gateway, Redis, the answer's way back).
    print(row("  of which the node's, around its compute", [s - c for s, c in zip(served, compute)]))
    print(row("  of which neither queue nor node", [e - w - s for e, w, s in zip(end_to_end, waits, served)]))
    print()
    print(f"CPU per query (the same {n} queries; the node's includes its compute; the client's, its calls only):")
    for name in ("gateway", "node", "client", "Redis"):
        if name in cpu:
            print(cpu_row(name, cpu[name], n))
    # A query of the digits model takes about a second: the gateway's background, paid per
    # second whatever the traffic, is most of its CPU per query. Apart, what the requests cost.
    print(f"  gateway idle, per second (before the queries) {idle_per_s * 1e3:8.2f} ms")
    print(cpu_row("gateway less its idle share", cpu["gateway"] - idle_per_s * loop_s, n))
    print(cpu_row("node compute (median, as timed by the node)", statistics.median(compute) * n, n))
    print()
    print(f"  pool node resident memory after the queries  {node_rss:8.0f} MB")
    print(f"  evaluation key {len(key_bytes) / 1e6:.1f} MB, ciphertext {len(encrypted)} B")


UNLIMITED = {"token_rate_per_s": 0, "account_rate_per_s": 0}
IDLE_S = 5.0  # how long the gateway's idle CPU is measured
PER_CALL_RUNS = 10  # the key deserialized per call: a figure of its cost, which a few runs show


def throughput(root: Path, n: int) -> None:
    """Queries/s on a fast model: all in flight at once through the pool vs in-process threads."""
    from concurrent.futures import ThreadPoolExecutor

    from concrete import fhe
    from concrete.ml.deployment import FHEModelClient, FHEModelServer

    from cipherpool.client import ManagementClient, QueryClient
    from cipherpool.config.settings import Settings
    from cipherpool.examples import train_breast_cancer
    from cipherpool.fhe.process import after_fhe
    from cipherpool.stack.embedded import EmbeddedStack, StackOptions

    cores = os.cpu_count() or 1
    example = train_breast_cancer(root / "cancer")
    x = example.x_test[0].reshape(1, -1)
    server = FHEModelServer(str(example.path))
    client = FHEModelClient(str(example.path), key_dir=str(root / "cancer-keys"))
    keys = fhe.EvaluationKeys.deserialize(client.get_serialized_evaluation_keys())
    ciphertext = client.quantize_encrypt_serialize(x)
    server.run(ciphertext, keys)
    after_fhe()  # SIGPIPE and the exit status back from concrete's runtime (cipherpool/fhe/process.py)
    with ThreadPoolExecutor(cores) as pool:
        t = time.perf_counter()
        list(pool.map(lambda _: server.run(ciphertext, keys), range(n)))
        in_process = n / (time.perf_counter() - t)

    settings = Settings(data_dir=root / "platform-tp", node_threads=1, **UNLIMITED)
    options = StackOptions(nodes=cores, node_concurrency=1, beat=False, flower=False, loglevel="WARNING")
    with EmbeddedStack(settings, options) as stack:
        mc = ManagementClient(stack.create_account("bench"), settings=stack.client_settings)
        mc.deploy_model("cancer", example.path, max_workers=cores)
        mc.activate_model("cancer")
        for _ in range(cores):
            mc.start_worker("cancer")
        qc = QueryClient(mc.create_token("bench", model="cancer"), settings=stack.client_settings, key_dir=root / "cancer-client")
        qc.generate_keys()
        qc.upload_evaluation_keys()
        encrypted = [qc.encrypt(example.x_test[i % len(example.x_test)]) for i in range(n)]
        qc.execute(encrypted[0])  # every node's key cache: warmed by the first queries below
        with ThreadPoolExecutor(4) as pool:
            t = time.perf_counter()
            handles = list(pool.map(qc.submit, encrypted))
            list(pool.map(lambda h: h.result(), handles))
            through_pool = n / (time.perf_counter() - t)
        qc.close()
        mc.close()
    print()
    print(f"throughput, breast-cancer logistic regression ({n} queries, all in flight at once):")
    print(f"  in process, {cores} threads (FHEModelServer.run)      {in_process:8.1f} queries/s")
    print(f"  through the pool ({cores} nodes x 1 thread, gateway)   {through_pool:8.1f} queries/s")
    print(f"  ratio                                          {through_pool / in_process:8.2f} x")


if __name__ == "__main__":
    main()
