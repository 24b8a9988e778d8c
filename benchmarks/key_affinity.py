"""Key affinity against today's random placement: key-cache hit rate, p50 and throughput
(issue 27), with the platform's own :class:`~cipherpool.fhe.keycache.KeyCache` on each node and
its own :class:`~cipherpool.affinity.Router`, in a discrete-event simulation (simulated time:
the whole run takes a few seconds, and gives the same figures each time for one seed).

What is simulated: ``--nodes`` nodes of one model, one query at a time each; each node's key
cache holds ``--cache-keys`` of the digits MLP's keys (34.5 MB serialized x key_memory_factor
6). A query whose key is cached computes for ``--hit-s`` (1.848 s: the digits MLP's
``FHEModelServer.run`` with a cached deserialized key, docs/performance.md), one whose key is
not for ``--miss-s`` (3.131 s: the key deserialized per call), each +-``--jitter`` at random.
Each query is for a key set drawn at random among the active ones. Two loads:

* latency: queries arrive at random (Poisson) at ``--load`` of what the nodes answer with
  every key cached; the p50 and p95 are of these queries' times (queue wait + compute);
* throughput: ``--clients`` x nodes clients each send their next query when the last is
  answered (the nodes never idle); queries per second answered.

Placements:

* random (today): every query on the model's queue; whichever node is free takes the next.
* affinity: a query goes to its key set's preferred node's own queue (rendezvous hashing over
  the nodes), to the next node in rank when that one has ``--bound`` queries outstanding, and
  to the model's queue when both have; a free node takes from its own queue first.

Usage: .venv/bin/python benchmarks/key_affinity.py [--nodes 4] [--cache-keys 2] [--queries 3000]
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
from collections import deque
from dataclasses import dataclass, field

from cipherpool.affinity import Choice, Router, replicas_for
from cipherpool.fhe.keycache import KeyCache

KEY_BYTES = 34_500_000  # the digits MLP's serialized evaluation key
MEMORY_FACTOR = 6.0


@dataclass
class Node:
    name: str
    cache: KeyCache[str]
    own: deque[tuple[int, str, float, Choice]] = field(default_factory=deque)
    busy: bool = False


@dataclass
class Result:
    placement: str
    key_sets: int
    hit_rate: float
    p50_s: float
    p95_s: float
    throughput: float
    fallbacks: float


def run(placement: str, key_sets: int, args: argparse.Namespace, seed: int, closed: bool) -> Result:
    rng = random.Random(seed)
    nodes = [
        Node(f"pool-{i}@host", KeyCache(int(args.cache_keys * KEY_BYTES * MEMORY_FACTOR), MEMORY_FACTOR))
        for i in range(args.nodes)
    ]
    names = [n.name for n in nodes]
    by_name = {n.name: n for n in nodes}
    router = Router(bound=args.bound, tries=args.tries or args.nodes)
    replicas = replicas_for(args.nodes, args.cache_keys * args.headroom, key_sets)
    shared: deque[tuple[int, str, float, Choice]] = deque()
    events: list[tuple[float, int, str, object]] = []  # (time, seq, kind, payload)
    seq = 0
    latencies: list[float] = []
    hits = lookups = sent = 0
    warm = args.queries // 10  # the first tenth warms the caches: not counted
    first_counted_at: float | None = None
    now = 0.0

    def push(at: float, kind: str, payload: object) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, kind, payload))

    def submit(client: int, key: str, at: float) -> None:
        nonlocal sent
        sent += 1
        choice = router.choose(key, names, replicas) if placement == "affinity" else Choice(None, False)
        item = (client, key, at, choice)
        (by_name[choice.node].own if choice.node else shared).append(item)
        idle = [n for n in nodes if not n.busy]
        if choice.node and not by_name[choice.node].busy:
            start(by_name[choice.node], at)
        elif choice.node is None and idle:
            start(rng.choice(idle), at)

    def start(node: Node, at: float) -> None:
        nonlocal hits, lookups
        queue = node.own if node.own else shared
        if not queue:
            node.busy = False
            return
        client, key, submitted, choice = queue.popleft()
        node.busy = True
        _, hit = node.cache.get_or_load(key, lambda: (key, KEY_BYTES))
        if sent > warm:
            hits += hit
            lookups += 1
        took = (args.hit_s if hit else args.miss_s) * rng.uniform(1 - args.jitter, 1 + args.jitter)
        push(at + took, "done", (node, client, key, submitted, choice))

    keys = [f"key-{k}" for k in range(key_sets)]
    rate = args.load * args.nodes / args.hit_s  # open loop: arrivals per second
    if closed:
        for client in range(args.clients * args.nodes):
            push(rng.random() * 0.01, "send", client)
    else:
        push(0.0, "arrive", None)
    done = 0
    while events and done < args.queries:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            submit(-1, rng.choice(keys), now)
            push(now + rng.expovariate(rate), "arrive", None)
            continue
        if kind == "send":
            submit(payload, rng.choice(keys), now)  # type: ignore[arg-type]
            continue
        node, client, key, submitted, choice = payload  # type: ignore[misc]
        router.done(choice)
        done += 1
        if done > warm:
            if first_counted_at is None:
                first_counted_at = now
            latencies.append(now - submitted)
        start(node, now)
        for idle in (n for n in nodes if not n.busy and (n.own or shared)):
            start(idle, now)
        if closed:
            push(now, "send", client)
    span = now - (first_counted_at or 0.0)
    quantiles = statistics.quantiles(latencies, n=20)
    return Result(
        placement,
        key_sets,
        hits / lookups if lookups else 0.0,
        statistics.median(latencies),
        quantiles[18],
        (len(latencies) - 1) / span if span > 0 else 0.0,
        router.fallbacks / router.routed if router.routed else 0.0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--cache-keys", type=int, default=2, help="keys one node's cache holds")
    parser.add_argument("--queries", type=int, default=3000, help="per run")
    parser.add_argument("--load", type=float, default=0.6, help="open loop: arrivals, as a share of the nodes' capacity")
    parser.add_argument("--clients", type=int, default=3, help="closed loop: clients per node")
    parser.add_argument("--bound", type=int, default=3, help="outstanding queries past which a node is passed over")
    parser.add_argument("--headroom", type=float, default=1.0, help="share of a node's cache affinity plans to fill")
    parser.add_argument(
        "--tries", type=int, default=2, help="homes, then this many - 1 further nodes in rank, before the model's queue"
    )
    parser.add_argument("--hit-s", type=float, default=1.848)
    parser.add_argument("--miss-s", type=float, default=3.131)
    parser.add_argument("--jitter", type=float, default=0.1, help="compute times vary by up to this share")
    parser.add_argument("--seeds", type=int, default=5, help="runs per figure (their medians are shown)")
    args = parser.parse_args()
    print(
        f"{args.nodes} nodes, a key cache of {args.cache_keys} digits keys each "
        f"({args.cache_keys * KEY_BYTES * MEMORY_FACTOR / 1e9:.2f} GB charged), bound {args.bound}, "
        f"latency at {args.load:.0%} load, throughput with {args.clients} clients per node, "
        f"{args.queries} queries per run, median of {args.seeds} seeds"
    )
    print(
        f"{'key sets':>9} {'x cache':>7} {'placement':>9} {'hit rate':>8} {'p50 s':>6} {'p95 s':>6} {'fallbk':>6}"
        f" | {'hit rate':>8} {'q/s':>6} {'fallbk':>6}"
    )
    for factor in (1, 2, 4):
        key_sets = factor * args.cache_keys
        for placement in ("random", "affinity"):
            opened = [run(placement, key_sets, args, seed, closed=False) for seed in range(args.seeds)]
            full = [run(placement, key_sets, args, seed, closed=True) for seed in range(args.seeds)]

            def med(runs: list[Result], attr: str) -> float:
                return statistics.median(getattr(r, attr) for r in runs)

            print(
                f"{key_sets:>9} {factor:>6}x {placement:>9} {med(opened, 'hit_rate') * 100:>7.1f}% "
                f"{med(opened, 'p50_s'):>6.2f} {med(opened, 'p95_s'):>6.2f} {med(opened, 'fallbacks') * 100:>5.1f}%"
                f" | {med(full, 'hit_rate') * 100:>7.1f}% {med(full, 'throughput'):>6.2f} {med(full, 'fallbacks') * 100:>5.1f}%"
            )


if __name__ == "__main__":
    main()
