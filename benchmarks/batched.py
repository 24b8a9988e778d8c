"""Batched queries (issue 27): throughput of the breast-cancer logistic regression (about 6 ms of
FHE per query), side by side in one run:

  * in process: ``FHEModelServer.run`` from as many threads as cores, the key deserialized once;
  * the pool, single queries: every query in flight at once from concurrent clients
    (``QueryClient.submit`` from 4 threads), through the gateway, Redis and as many pool nodes
    as cores (1 thread each);
  * the pool, batches of 8, 32 and 128: the same queries as ``submit_many`` batches, all in
    flight at once (one task per batch, answered item by item).

Each figure is the median of ``--rounds`` rounds of ``--queries`` queries (encryption done
before the clock starts; decryption left out on both sides). Prints q/s and the ratio to in
process: the median of each round's ratio, every round measuring every configuration
back to back (target for batches: >= 0.8x, docs/performance.md).

Usage: .venv/bin/python benchmarks/batched.py [--queries 256] [--rounds 3]
Figures, not assertions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BATCH_SIZES = (8, 32, 128)
CLIENT_THREADS = 4
UNLIMITED = {"token_rate_per_s": 0, "account_rate_per_s": 0}


def rate(n: int, rounds: int, once: Callable[[], None]) -> tuple[float, list[float]]:
    """Median queries/s of ``rounds`` runs of ``once`` (which makes ``n`` queries), and each round's."""
    figures = []
    for _ in range(rounds):
        t = time.perf_counter()
        once()
        figures.append(n / (time.perf_counter() - t))
    return statistics.median(figures), figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=256, help="queries per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cipherpool-batched-"))
    tempfile.tempdir = str(root)  # concrete's compile directories go here, removed at the end
    try:
        bench(root, max(16, args.queries), max(1, args.rounds))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bench(root: Path, n: int, rounds: int) -> None:
    from concrete import fhe
    from concrete.ml.deployment import FHEModelClient, FHEModelServer

    from cipherpool.client import ManagementClient, QueryClient
    from cipherpool.config.settings import Settings
    from cipherpool.examples import train_breast_cancer
    from cipherpool.fhe.process import after_fhe
    from cipherpool.messages import batch_items
    from cipherpool.stack.embedded import EmbeddedStack, StackOptions

    cores = os.cpu_count() or 1
    example = train_breast_cancer(root / "cancer")
    rows = [example.x_test[i % len(example.x_test)] for i in range(n)]

    server = FHEModelServer(str(example.path))
    client = FHEModelClient(str(example.path), key_dir=str(root / "keys"))
    keys = fhe.EvaluationKeys.deserialize(client.get_serialized_evaluation_keys())
    plain = [client.quantize_encrypt_serialize(r.reshape(1, -1)) for r in rows]
    server.run(plain[0], keys)
    after_fhe()  # SIGPIPE and the exit status back from concrete's runtime (cipherpool/fhe/process.py)

    # Every round measures every configuration back to back, so that each ratio compares
    # neighbours in time (a shared machine's load moves between rounds).
    figures: dict[str, list[float]] = {}
    node_share: list[float] = []
    settings = Settings(data_dir=root / "platform", node_threads=1, **UNLIMITED)
    options = StackOptions(nodes=cores, node_concurrency=1, beat=False, flower=False, loglevel="WARNING")
    with EmbeddedStack(settings, options) as stack, ThreadPoolExecutor(cores) as threads:
        mc = ManagementClient(stack.create_account("bench"), settings=stack.client_settings)
        mc.deploy_model("cancer", example.path, max_workers=cores)
        mc.activate_model("cancer")
        for _ in range(cores):
            mc.start_worker("cancer")
        qc = QueryClient(mc.create_token("bench", model="cancer"), settings=stack.client_settings, key_dir=root / "client")
        qc.generate_keys()
        qc.upload_evaluation_keys()
        encrypted = [qc.encrypt(r) for r in rows]
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            list(pool.map(lambda c: qc.execute(c), encrypted[: 4 * cores]))  # every node's key cache warm

            def in_process() -> None:
                list(threads.map(lambda c: server.run(c, keys), plain))

            def singles() -> None:
                handles = list(pool.map(qc.submit, encrypted))
                list(pool.map(lambda h: h.result(), handles))

            def batches(size: int) -> Callable[[], None]:
                chunks = [encrypted[i : i + size] for i in range(0, n, size)]

                def once() -> None:
                    handles = list(pool.map(qc.submit_many, chunks))
                    answers = list(pool.map(lambda h: batch_items(h.result(), size), handles))
                    assert all(isinstance(a, bytes) for items in answers for a in items)
                    for h in handles:
                        node_share.append(h.timings["compute_s"] / max(1e-9, h.timings["server_total_s"]))

                return once

            runs = {
                f"in process, {cores} threads (FHEModelServer.run)": in_process,
                f"pool, single queries ({cores} nodes x 1 thread)": singles,
                **{f"pool, batches of {size} ({cores} nodes x 1 thread)": batches(size) for size in BATCH_SIZES},
            }
            for _ in range(rounds):
                for label, once in runs.items():
                    figures.setdefault(label, []).append(rate(n, 1, once)[0])
        qc.close()
        mc.close()

    base = figures[next(iter(figures))]
    print(f"batched queries: breast-cancer logistic regression, {cores} cores, {n} queries per round, median of {rounds} rounds")
    for label, each in figures.items():
        ratios = [v / b for v, b in zip(each, base, strict=True)]
        print(
            f"  {label:<46} {statistics.median(each):8.1f} q/s   {statistics.median(ratios):4.2f}x"
            f"   rounds {_r(each)} q/s, ratios {' '.join(f'{r:.2f}' for r in ratios)}"
        )
    print(f"  node: compute is {statistics.median(node_share):.0%} of a batch's time on the node (median)")


def _r(values: list[float]) -> str:
    return " ".join(f"{v:.0f}" for v in values)


if __name__ == "__main__":
    main()
