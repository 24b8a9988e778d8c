"""Key affinity on a real pool (issue 27): key-cache hit rate, p50, p95 and queries/s of the
digits MLP with today's random placement against key affinity, side by side in one run.

What runs: an embedded stack (its own Redis, the HTTP gateway, ``--nodes`` real ``celery
worker`` pool nodes of one thread each), a worker of the model on every node. Each node's key
cache holds exactly ``--cache-keys`` of the model's keys: a key is charged its serialized size
x ``key_memory_factor`` (6.0), and the size is measured on a key set generated in this process
before any stack starts; the cache is that many charges plus half of one.

For each placement, one stack (the setting is read by the gateway and the nodes at start):

* random (``Settings(key_affinity=False)``, today): every query on the model's queue, taken by
  whichever node is free;
* affinity (``key_affinity=True``): a query goes to the least busy of its key set's homes
  (rendezvous hashing; as many homes as the caches have room for among the active key sets,
  ``CIPHERPOOL_AFFINITY_KEYS_PER_NODE``), the next node in rank when that one has
  ``CIPHERPOOL_AFFINITY_BOUND`` (2) queries outstanding, then the model's queue.

and in it, for each number of active key sets K in ``--key-sets`` (default 1x, 2x and 4x of
``--cache-keys``: 2, 4 and 8): K end users, each with its own token and key set (the same key
sets in both stacks: generated once, copied to the second stack's key directory, uploaded to
each stack without the gateway's warm-up). A warm-up pass of ``2 x max(K, clients)`` queries,
not counted, then a closed loop: ``--clients`` threads each pick a key set at random (seeded)
and submit one query and wait for its answer, until ``--queries`` are answered. Ciphertexts are
encrypted before the clock starts; decryption is left out. Per query: the client's latency
(submit to result) and the node's X-Cipherpool-Key-Cache header (hit or miss). q/s is the
queries over the loop's wall time. With affinity, the gateway's own routing decisions in the
loop (its ``/metrics``: ``cipherpool_affinity_routes_total``) give the share of fallbacks, to
the next node in rank and to the model's queue; for both placements each node's share of the
loop's queries and the keys in each node's cache after it; and the same loop as the model's
own figures have it (``mc.model_stats``: the nodes' key-cache hit rate, and FALLBACK: queries
that came through the model's queue or to a node as the next in rank).

Usage: .venv/bin/python benchmarks/key_affinity_pool.py [--queries 40] [--key-sets 2,4,8]
       [--cache-keys 2] [--nodes 4] [--clients 4] [--seed 0]
On a 2-core machine the 4 nodes share 2 cores (a query takes about twice as long as alone).
Figures, not assertions.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

UNLIMITED = {"token_rate_per_s": 0, "account_rate_per_s": 0}
METRICS_TOKEN = "key-affinity-bench"  # the gateway's /metrics: its routing decisions
MODEL = "digits"
ROWS_PER_KEY_SET = 4  # distinct ciphertexts per key set, sent in turn
PLACEMENTS = (("random", False), ("affinity", True))


@dataclass
class Figures:
    placement: str
    key_sets: int
    latencies: list[float] = field(default_factory=list)
    hits: int = 0
    misses: int = 0
    wall_s: float = 0.0
    routes: Counter[str] = field(default_factory=Counter)  # the gateway's decisions in the loop: home, next, any
    spread: list[int] = field(default_factory=list)  # the loop's queries per node
    homes: list[int] = field(default_factory=list)  # key sets per node (their first in rank)
    cached: list[int] = field(default_factory=list)  # keys in each node's cache after the loop
    recorded: Counter[str] = field(default_factory=Counter)  # the model's own figures for the loop (see recorded())

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=40, help="measured queries per configuration")
    parser.add_argument("--key-sets", default="", help="active key sets, comma-separated (default: 1x,2x,4x of --cache-keys)")
    parser.add_argument("--cache-keys", type=int, default=2, help="keys each node's cache holds")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4, help="client threads of the closed loop")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cache_keys = max(1, args.cache_keys)
    key_sets = [int(k) for k in args.key_sets.split(",") if k.strip()] or [cache_keys, 2 * cache_keys, 4 * cache_keys]
    root = Path(tempfile.mkdtemp(prefix="cipherpool-affinity-pool-"))
    tempfile.tempdir = str(root)  # concrete's compile directories go here, removed at the end
    started = time.perf_counter()
    try:
        results = bench(root, args, cache_keys, key_sets)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(results, args, cache_keys, key_sets, time.perf_counter() - started)


def bench(root: Path, args: argparse.Namespace, cache_keys: int, key_sets: list[int]) -> list[Figures]:
    from concrete.ml.deployment import FHEModelClient

    from cipherpool.config.settings import Settings
    from cipherpool.examples import train_digits

    example = train_digits(root / MODEL)
    factor = Settings().key_memory_factor
    probe = FHEModelClient(str(example.path), key_dir=str(root / "probe-keys"))
    charge = int(len(probe.get_serialized_evaluation_keys()) * factor)  # as the node's KeyCache charges it
    capacity = cache_keys * charge + charge // 2  # cache_keys keys fit, one more does not
    print(
        f"digits MLP: evaluation key {charge / factor / 1e6:.1f} MB, charged {charge / 1e6:.0f} MB; "
        f"key cache {capacity / 1e6:.0f} MB per node ({cache_keys} keys)",
        flush=True,
    )
    results: list[Figures] = []
    users = max(key_sets)
    keys_from: list[Path | None] = [None] * users  # each user's key directory in the first stack
    for placement, affinity in PLACEMENTS:
        settings = Settings(
            data_dir=root / f"platform-{placement}",
            node_threads=1,
            key_affinity=affinity,
            key_cache_bytes=capacity,
            metrics_token=METRICS_TOKEN,
            **UNLIMITED,
        )
        results += run_stack(root, placement, settings, example, args, key_sets, users, keys_from, charge)
    return results


def run_stack(
    root: Path,
    placement: str,
    settings: Any,
    example: Any,
    args: argparse.Namespace,
    key_sets: list[int],
    users: int,
    keys_from: list[Path | None],
    charge: int,
) -> list[Figures]:
    from cipherpool.affinity import ranked
    from cipherpool.client import ManagementClient, QueryClient
    from cipherpool.stack.embedded import EmbeddedStack, StackOptions

    options = StackOptions(nodes=args.nodes, node_concurrency=1, beat=False, flower=False, loglevel="WARNING")
    out: list[Figures] = []
    t = time.perf_counter()
    with EmbeddedStack(settings, options) as stack:
        mc = ManagementClient(stack.create_account("bench"), settings=stack.client_settings)
        mc.deploy_model(MODEL, example.path, max_workers=args.nodes)
        mc.activate_model(MODEL)
        nodes = [w.node for w in mc.start_workers(MODEL, args.nodes)]
        clients: list[Any] = []
        ciphertexts: list[list[bytes]] = []
        for i in range(users):
            key_dir = root / f"client-{placement}-{i}"
            qc = QueryClient(mc.create_token(f"user-{i}", model=MODEL), settings=stack.client_settings, key_dir=key_dir)
            here = key_dir / f"{qc.model.id}-{qc.model.client_zip_sha256[:12]}"  # ClientCrypto's directory
            if keys_from[i] is not None:
                shutil.copytree(keys_from[i], here, dirs_exist_ok=True)  # the same key set (and id) again
            qc.generate_keys()  # loads the copied keys, or makes them
            keys_from[i] = here
            if abs(len(qc.crypto.evaluation_key()) * settings.key_memory_factor - charge) > charge / (4 * args.cache_keys):
                print(f"  warning: user {i}'s key is not the size the cache was sized for", flush=True)
            qc.upload_evaluation_keys(warm_up=False)  # the warm-up pass below warms the caches alike
            rows = [example.x_test[(i * ROWS_PER_KEY_SET + r) % len(example.x_test)] for r in range(ROWS_PER_KEY_SET)]
            ciphertexts.append([qc.encrypt(row) for row in rows])
            clients.append(qc)
        print(f"{placement}: stack up, {users} key sets made and uploaded in {time.perf_counter() - t:.0f} s", flush=True)
        for k in key_sets:
            figures = Figures(placement, k)
            key_ids = [qc.crypto.key_id() for qc in clients[:k]]
            home = Counter(ranked(key_id, nodes)[0] for key_id in key_ids)
            figures.homes = sorted((home[n] for n in nodes), reverse=True)
            rng = random.Random(f"{args.seed}-{k}")
            warm = 2 * max(k, args.clients)
            loop(clients[:k], ciphertexts[:k], warm, args.clients, rng, Figures(placement, k))
            time.sleep(1.0)  # the warm-up's last figures recorded
            before, routes, recorded_before = per_node(mc), routes_of(stack.gateway_url), recorded(mc)
            loop(clients[:k], ciphertexts[:k], max(1, args.queries), args.clients, rng, figures)
            time.sleep(1.0)  # the nodes record each query's figures as it ends
            after = per_node(mc)
            figures.routes = routes_of(stack.gateway_url) - routes
            figures.recorded = recorded(mc) - recorded_before
            figures.spread = sorted((after[n] - before[n] for n in nodes), reverse=True)
            figures.cached = sorted((w.key_cache.entries for w in mc.worker_stats(MODEL)), reverse=True)
            out.append(figures)
            print(
                f"  {placement:<8} K={k}: hit {figures.hit_rate:.0%}, p50 {statistics.median(figures.latencies):.2f} s, "
                f"{figures.rate:.2f} q/s ({figures.wall_s:.0f} s)",
                flush=True,
            )
        for qc in clients:
            qc.close()
        mc.close()
    return out


def per_node(mc: Any) -> Counter[str]:
    """The model's queries so far on each node (its recorded figures, all-time)."""
    counts: Counter[str] = Counter()
    for model in mc.model_stats(MODEL):
        for w in model.workers:
            if w.node:
                counts[w.node] += w.all_time.queries
    return counts


def recorded(mc: Any) -> Counter[str]:
    """The model's all-time figures as its nodes recorded them: key-cache hits and misses, and
    queries that came through a node's own affinity queue (routed) or the model's queue
    (fallbacks), for ``mc.model_stats``' FALLBACK figure."""
    counts: Counter[str] = Counter()
    for model in mc.model_stats(MODEL):
        a = model.all_time
        counts.update(hits=a.key_cache_hits, misses=a.key_cache_misses, routed=a.affinity_routed, fallbacks=a.affinity_fallbacks)
    return counts


def routes_of(gateway_url: str) -> Counter[str]:
    """The gateway's routing decisions so far (``cipherpool_affinity_routes_total``), by
    placement: home, next (the next node in rank) and any (the model's queue); none with
    key affinity off."""
    import httpx

    text = httpx.get(f"{gateway_url}/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"}, timeout=30).text
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("cipherpool_affinity_routes_total{"):
            labels, _, value = line.rpartition(" ")
            counts[labels.split('placement="')[1].split('"')[0]] += int(float(value))
    return counts


def loop(clients: list[Any], ciphertexts: list[list[bytes]], n: int, threads: int, rng: random.Random, into: Figures) -> None:
    """A closed loop of ``n`` queries from ``threads`` threads, each query for a key set drawn
    at random (the draws made up front, in order, so that one seed gives one sequence)."""
    draws = [rng.randrange(len(clients)) for _ in range(n)]
    sent = Counter[int]()
    lock = threading.Lock()
    taken = iter(range(n))

    def one_thread() -> None:
        while True:
            with lock:
                i = next(taken, None)
                if i is None:
                    return
                k = draws[i]
                ciphertext = ciphertexts[k][sent[k] % len(ciphertexts[k])]
                sent[k] += 1
            t = time.perf_counter()
            handle = clients[k].submit(ciphertext)
            handle.result()
            latency = time.perf_counter() - t
            with lock:
                into.latencies.append(latency)
                if handle.key_cache == "hit":
                    into.hits += 1
                elif handle.key_cache == "miss":
                    into.misses += 1

    workers = [threading.Thread(target=one_thread) for _ in range(max(1, threads))]
    t = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    into.wall_s = time.perf_counter() - t


def report(results: list[Figures], args: argparse.Namespace, cache_keys: int, key_sets: list[int], total_s: float) -> None:
    print()
    print(
        f"key affinity on a real pool: digits MLP, {args.nodes} nodes x 1 thread, key cache {cache_keys} keys per node, "
        f"{args.clients} clients in a closed loop, {args.queries} queries per row (seed {args.seed}); "
        f"{total_s / 60:.1f} min in all"
    )
    print(
        f"  {'placement':<9} {'K':>3} {'hit rate':>8} {'p50 s':>7} {'p95 s':>7} {'q/s':>6}  {'next/any':>9}  "
        f"{'homes/node':<12} {'queries/node':<16} {'cached/node'}"
    )
    for f in results:
        decided = sum(f.routes.values())
        fallback = f"{f.routes['next'] / decided:.0%}/{f.routes['any'] / decided:.0%}" if decided else "-"
        print(
            f"  {f.placement:<9} {f.key_sets:>3} {f.hit_rate:>8.0%} {statistics.median(f.latencies):>7.2f} "
            f"{pct(f.latencies, 0.95):>7.2f} {f.rate:>6.2f}  {fallback:>9}  "
            f"{_slash(f.homes) if f.placement == 'affinity' else '-':<12} {_slash(f.spread):<16} {_slash(f.cached)}"
        )
    print("  the model's own figures for the same loops (mc.model_stats, all-time, differences):")
    for f in results:
        r = f.recorded
        looked, came = r["hits"] + r["misses"], r["routed"] + r["fallbacks"]
        hit = f"{r['hits'] / looked:.0%}" if looked else "-"
        fallback = f"{r['fallbacks'] / came:.0%}" if came else "-"
        print(f"    {f.placement:<9} K={f.key_sets:<3} key-cache hit rate {hit:>4}   FALLBACK {fallback:>4}")
    print("  affinity / random:")
    by = {(f.placement, f.key_sets): f for f in results}
    for k in key_sets:
        a, r = by.get(("affinity", k)), by.get(("random", k))
        if a is None or r is None:
            continue
        p50 = statistics.median(a.latencies) / statistics.median(r.latencies)
        rate = a.rate / r.rate if r.rate else float("nan")
        print(f"    K={k:<3} p50 {p50:5.2f}x   q/s {rate:5.2f}x   hit rate {r.hit_rate:.0%} -> {a.hit_rate:.0%}")
    print(
        "  next/any: the gateway's fallbacks in the loop, to the next node in rank / to the model's queue; "
        "homes/node: key sets whose first node in rank it is; queries/node: the loop's queries each node ran; "
        "cached/node: keys in each node's cache after the loop (each sorted, largest first)"
    )


def _slash(values: list[int]) -> str:
    return "/".join(str(v) for v in values) if values else "-"


if __name__ == "__main__":
    main()
