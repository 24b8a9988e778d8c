"""The platform's cost per query of two checkouts, side by side in one run.

This machine's speed drifts between runs by more than a change to the query path is worth
(in-process digits read 806-980 ms within an hour), so a before and an after measured one
after the other compare the machine as much as the code. Here both run at once: two embedded
stacks (each its own Redis, gateway and one pool node of one thread), one from this checkout
and one from ``--other`` (a worktree of the commit before, say), each driven by a process of
its own; single queries alternate between them, in a random order within each round, so that
whatever the machine does meanwhile falls on both alike. Neither stack computes while the other
answers.

Printed per stack: end to end, node compute, queue wait, and end to end less compute
(median and p95), and their ratios this/other; then each side's CPU per query of its gateway,
node and Redis (totals over the run).

Usage: .venv/bin/python benchmarks/path_ab.py --other /tmp/before [--model cancer] [--queries 400]
(``git worktree add /tmp/before HEAD~1`` makes the other checkout; it needs no script of its own:
this file runs there with that checkout's package first on the path.)
Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def serve(model: str) -> None:
    """The driver of one stack: a line on stdin runs one query; its figures go to stdout."""
    root = Path(tempfile.mkdtemp(prefix="path-ab-"))
    tempfile.tempdir = str(root)
    from cipherpool.client import ManagementClient, QueryClient
    from cipherpool.config.settings import Settings
    from cipherpool.examples import train_breast_cancer, train_digits
    from cipherpool.stack.embedded import EmbeddedStack, StackOptions

    example = (train_digits if model == "digits" else train_breast_cancer)(root / model)
    settings = Settings(data_dir=root / "platform", node_threads=1, token_rate_per_s=0, account_rate_per_s=0)
    options = StackOptions(nodes=1, node_concurrency=1, beat=False, flower=False, loglevel="WARNING")
    try:
        with EmbeddedStack(settings, options) as stack:
            mc = ManagementClient(stack.create_account("bench"), settings=stack.client_settings)
            mc.deploy_model(model, example.path)
            mc.activate_model(model)
            mc.start_worker(model)
            qc = QueryClient(mc.create_token("bench", model=model), settings=stack.client_settings, key_dir=root / "keys")
            qc.generate_keys()
            qc.upload_evaluation_keys()
            ciphertext = qc.encrypt(example.x_test[0])
            for _ in range(5):
                qc.execute(ciphertext)  # key cached, model warm
            pids = {c.name: c.pid for c in stack.supervisor.children}
            watched = {"gateway": pids["gateway"], "node": pids["node1"], "redis": pids["redis"]}
            print(json.dumps({"ready": str(Path(sys.modules["cipherpool"].__file__ or "").parent)}), flush=True)
            for line in sys.stdin:
                if line.strip() != "q":
                    break
                t = time.perf_counter()
                qc.execute(ciphertext)
                e2e = time.perf_counter() - t
                timings = qc.last_timings
                figures = {"e2e": e2e, "compute": timings["compute_s"], "wait": timings["queue_wait_s"]}
                figures.update({f"cpu:{name}": cpu_s(pid) for name, pid in watched.items()})  # running totals
                print(json.dumps(figures), flush=True)
            qc.close()
            mc.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (``/proc/<pid>/stat``, in 10 ms
    ticks: a figure per query is a total over the run divided by its queries)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(tree: Path, model: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = [sys.executable, str(HERE), "--serve", "--model", model]
    return subprocess.Popen(argv, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def ask(driver: subprocess.Popen[str]) -> dict[str, float]:
    assert driver.stdin is not None and driver.stdout is not None
    driver.stdin.write("q\n")
    driver.stdin.flush()
    return dict(json.loads(driver.stdout.readline()))


def ready(driver: subprocess.Popen[str]) -> str:
    assert driver.stdout is not None
    line = driver.stdout.readline()
    if not line:
        raise SystemExit("a stack did not start (its output is above)")
    return str(json.loads(line)["ready"])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, help="the other checkout (e.g. a worktree of the commit before)")
    parser.add_argument("--this", type=Path, default=HERE.parents[1], help="this side's checkout (default: this file's)")
    parser.add_argument("--model", choices=["cancer", "digits"], default="cancer")
    parser.add_argument("--queries", type=int, default=400, help="queries per stack")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.model)
        return
    if args.other is None:
        parser.error("--other names the checkout to compare with")
    drivers = {"this": start(args.this.resolve(), args.model), "other": start(args.other.resolve(), args.model)}
    try:
        where = {name: ready(driver) for name, driver in drivers.items()}
        figures: dict[str, list[dict[str, float]]] = {name: [] for name in drivers}
        rng = random.Random(0)
        for _ in range(args.queries):
            order = list(drivers)
            rng.shuffle(order)
            for name in order:
                figures[name].append(ask(drivers[name]))
    finally:
        for driver in drivers.values():
            if driver.stdin:
                driver.stdin.close()
        for driver in drivers.values():
            driver.wait(60)
    print(f"{args.model}, {args.queries} single queries per stack, alternating; 1 node x 1 thread each")
    for name in drivers:
        print(f"  {name:5}: {where[name]}")
    rows = {
        "end to end": lambda f: f["e2e"],
        "node compute": lambda f: f["compute"],
        "queue wait": lambda f: f["wait"],
        "end to end less compute": lambda f: f["e2e"] - f["compute"],
    }
    print(f"  {'ms':<26}{'this p50':>10}{'other p50':>11}{'ratio':>8}{'this p95':>10}{'other p95':>11}{'ratio':>8}")
    for label, of in rows.items():
        this = [of(f) * 1e3 for f in figures["this"]]
        other = [of(f) * 1e3 for f in figures["other"]]
        p50 = statistics.median(this), statistics.median(other)
        p95 = pct(this, 0.95), pct(other, 0.95)
        print(
            f"  {label:<26}{p50[0]:10.2f}{p50[1]:11.2f}{p50[0] / p50[1]:8.2f}x{p95[0]:10.2f}{p95[1]:11.2f}{p95[0] / p95[1]:8.2f}x"
        )
    # CPU per query: each process's total over the run (from the first query's answer to the
    # last's) over the queries between; the two stacks' runs interleave, so drift falls on both.
    print(f"  {'CPU per query, ms':<26}{'this':>10}{'other':>11}{'ratio':>8}")
    for process in ("gateway", "node", "redis"):
        key = f"cpu:{process}"
        per = [(figures[n][-1][key] - figures[n][0][key]) / max(1, len(figures[n]) - 1) * 1e3 for n in ("this", "other")]
        print(f"  {process:<26}{per[0]:10.2f}{per[1]:11.2f}{per[0] / per[1] if per[1] else float('nan'):8.2f}x")


if __name__ == "__main__":
    main()
