"""Saturation: a pool whose every node is busy, against the best the same machine does in one
process, on a compute-bound model (issue 8: pool >= 0.95x the best in-process throughput).

The model is a depth-4 decision tree on scikit-learn's breast-cancer data (bootstrapping,
about a second a query). In process, every split of the cores into parallel executions x
OpenMP threads is tried, each in a fresh process (OMP_NUM_THREADS is read when concrete is
imported); the best is the reference. Through the pool, the profile gives each of the N nodes
one execution of cores/N threads, and every query is in flight at once through the gateway.
Ciphertexts are made before the clock starts, and every node has the key warmed.

Usage: .venv/bin/python benchmarks/saturation.py [--queries 24] [--nodes 2] [--repeats 3]
Figures, not assertions: docs/performance.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train(path: Path) -> Path:
    from concrete.ml.sklearn import DecisionTreeClassifier
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    model = DecisionTreeClassifier(max_depth=4, n_bits=6)
    model.fit(x, y)
    model.compile(x)
    from concrete.ml.deployment import FHEModelDev

    FHEModelDev(str(path), model).save()
    return path


def in_process(model: Path, executions: int, queries: int, key_dir: Path, start_at: float = 0.0) -> float:
    """Queries/s of ``executions`` threads running FHEModelServer.run (this process's OMP threads);
    ``start_at``: wall-clock time to start at, so that several processes run at once."""
    from concurrent.futures import ThreadPoolExecutor

    from concrete import fhe
    from concrete.ml.deployment import FHEModelClient, FHEModelServer
    from sklearn.datasets import load_breast_cancer

    from cipherpool.fhe.process import after_fhe

    x, _ = load_breast_cancer(return_X_y=True)
    server = FHEModelServer(str(model))
    client = FHEModelClient(str(model), key_dir=str(key_dir))
    keys = fhe.EvaluationKeys.deserialize(client.get_serialized_evaluation_keys())
    ciphertexts = [client.quantize_encrypt_serialize(x[i : i + 1]) for i in range(queries)]
    server.run(ciphertexts[0], keys)  # the key's first use
    after_fhe()  # SIGPIPE and the exit status back from concrete's runtime (cipherpool/fhe/process.py)
    time.sleep(max(0.0, start_at - time.time()))
    with ThreadPoolExecutor(executions) as pool:
        started = time.perf_counter()
        list(pool.map(lambda c: server.run(c, keys), ciphertexts))
        return queries / (time.perf_counter() - started)


def through_pool(model: Path, nodes: int, threads: int, queries: int, root: Path) -> tuple[float, dict[str, int]]:
    from concurrent.futures import ThreadPoolExecutor

    import redis
    from sklearn.datasets import load_breast_cancer

    from cipherpool.client import ManagementClient, QueryClient
    from cipherpool.config.settings import Settings
    from cipherpool.gateway.results import computed_by
    from cipherpool.stack.embedded import EmbeddedStack, StackOptions

    root.mkdir(parents=True, exist_ok=True)  # a stack of its own each round: a fresh database
    (root / "profiles.toml").write_text(f'[profiles.bench]\nhost_class = "cpu"\nconcurrency = 1\nthreads = {threads}\n')
    settings = Settings(
        data_dir=root / "platform",
        profiles_file=root / "profiles.toml",
        token_rate_per_s=0,
        account_rate_per_s=0,
        query_timeout_s=600,
    )
    options = StackOptions(profiles=["bench"] * nodes, beat=False, flower=False, loglevel="WARNING")
    x, _ = load_breast_cancer(return_X_y=True)
    with EmbeddedStack(settings, options) as stack:
        mc = ManagementClient(stack.create_account("bench"), settings=stack.client_settings)
        mc.deploy_model("tree", model, max_workers=nodes)
        mc.activate_model("tree")
        mc.start_workers("tree", nodes)
        qc = QueryClient(mc.create_token("bench", model="tree"), settings=stack.client_settings, key_dir=root / "keys")
        qc.generate_keys()
        qc.upload_evaluation_keys()  # warms the key on every node
        ciphertexts = [qc.encrypt(x[i]) for i in range(queries)]
        # Which node computed each: read from the platform's stored result as soon as it is
        # delivered (end users are not told; a delivered result is kept a minute).
        with ThreadPoolExecutor(8) as pool, redis.Redis.from_url(stack.broker_url) as store:
            started = time.perf_counter()
            handles = list(pool.map(qc.submit, ciphertexts))
            computed = list(pool.map(lambda h: (h.result(600), computed_by(store, h.id))[1] or "?", handles))
            rate = queries / (time.perf_counter() - started)
        spread: dict[str, int] = {}
        for node in computed:
            spread[node] = spread.get(node, 0) + 1
        computes = sorted(h.timings.get("compute_s", 0.0) for h in handles)
        spread["median compute ms"] = int(computes[len(computes) // 2] * 1000)
        qc.close()
        mc.close()
    return rate, spread


def processes(model: Path, count: int, threads: int, queries: int) -> float:
    """What the pool's profile does without the platform: ``count`` processes of one execution
    and ``threads`` threads each, all timing the same moment; their rates add up."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start_at = time.time() + 45  # after every child has made its keys and warmed its key
    children = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--in-process",
                "1",
                "0",
                "--model",
                str(model),
                "--queries",
                str(queries // count),
                "--start-at",
                str(start_at),
            ],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    return sum(float(child.communicate()[0].strip().splitlines()[-1]) for child in children)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=24)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="Rounds of every configuration; medians are reported.")
    parser.add_argument("--in-process", nargs=2, type=int, metavar=("EXECUTIONS", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:  # a child: one configuration, its own OMP_NUM_THREADS
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(in_process(args.model, args.in_process[0], args.queries, Path(tmp), args.start_at)))
        return
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="cipherpool-saturation-") as tmp:
        root = Path(tmp)
        model = train(root / "tree")
        runs: dict[str, list[float]] = {}
        spread: dict[str, int] = {}
        threads = max(1, cores // args.nodes)
        # Rounds, each running every configuration once: a noisy minute of the machine then
        # lands on all of them, not on one, and the medians compare like with like.
        for round_ in range(args.repeats):
            for executions in sorted({1, cores // 2 or 1, cores}):
                runs.setdefault(f"in process, {executions} execution(s) x {max(1, cores // executions)} thread(s)", []).append(
                    _one_in_process(model, executions, cores, args.queries)
                )
            runs.setdefault(f"{args.nodes} processes at once, 1 execution x {threads} thread(s) each (no platform)", []).append(
                processes(model, args.nodes, threads, args.queries)
            )
            pool, spread = through_pool(model, args.nodes, threads, args.queries, root / f"round{round_ + 1}")
            runs.setdefault(POOL, []).append(pool)
            print(
                f"round {round_ + 1}: " + ", ".join(f"{name}: {rates[-1]:.2f}/s" for name, rates in runs.items()),
                file=sys.stderr,
                flush=True,
            )  # each round's figures, as it ends
    _report(runs, spread, args, cores, threads)


POOL = "through the pool"


def _one_in_process(model: Path, executions: int, cores: int, queries: int) -> float:
    """One configuration in a fresh process (OMP_NUM_THREADS is read when concrete is imported)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // executions))}
    out = subprocess.run(
        [sys.executable, __file__, "--in-process", str(executions), "0", "--model", str(model), "--queries", str(queries)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _report(runs: dict[str, list[float]], spread: dict[str, int], args: argparse.Namespace, cores: int, threads: int) -> None:
    print(
        f"saturation, decision tree (depth 4, 6 bits) on breast cancer, {args.queries} queries in flight, "
        f"{cores} cores, median of {args.repeats} round(s) (min-max):"
    )
    medians = {name: statistics.median(rates) for name, rates in runs.items()}
    for name, rates in runs.items():
        label = f"{POOL}, {args.nodes} nodes x 1 execution x {threads} thread(s)" if name == POOL else name
        print(f"  {label:<70} {medians[name]:6.2f} queries/s  ({min(rates):.2f}-{max(rates):.2f})")
    best = max(m for name, m in medians.items() if name != POOL)
    print(f"  {'pool / best in process (medians)':<70} {medians[POOL] / best:6.2f} x   (target >= 0.95)")
    print(f"  queries per node, last round: {', '.join(f'{n.split(chr(64))[0]} {c}' for n, c in sorted(spread.items()))}")


if __name__ == "__main__":
    main()
