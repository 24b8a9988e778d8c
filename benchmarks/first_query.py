"""First query with a new key, with and without the key warm-up, beside a warm query; and
resume from standby.

One embedded stack, one node serving the digits model. For each round a new client makes a
key set, uploads it (with the warm-up: the node evaluates one throwaway ciphertext under the
new keys, so the key is deserialized and used; or without), then times its first query and a
second one. Also times `resume_worker` after `standby_worker` (no model load).

Usage: .venv/bin/python benchmarks/first_query.py [--rounds 3]
Figures, not assertions: docs/performance.md quotes them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    from cipherpool.client import ManagementClient, QueryClient
    from cipherpool.config.settings import Settings
    from cipherpool.examples import train_digits
    from cipherpool.stack.embedded import EmbeddedStack, StackOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cipherpool-first-") as tmp:
        root = Path(tmp)
        example = train_digits(root / "digits")
        settings = Settings(data_dir=root / "platform", token_rate_per_s=0, account_rate_per_s=0)
        with EmbeddedStack(settings, StackOptions(nodes=1, beat=False, flower=False, loglevel="WARNING")) as stack:
            mc = ManagementClient(stack.create_account("bench"), settings=stack.client_settings)
            mc.deploy_model("digits", example.path)
            mc.activate_model("digits")
            worker = mc.start_worker("digits")
            token = mc.create_token("bench", model="digits")
            x = example.x_test[0]
            rows: dict[bool, dict[str, list[float]]] = {}
            for round_ in range(args.rounds):
                for warm in (False, True):
                    qc = QueryClient(token, settings=stack.client_settings, key_dir=root / f"keys-{round_}-{warm}")
                    qc.generate_keys()
                    t0 = time.perf_counter()
                    qc.upload_evaluation_keys(warm_up=warm)
                    upload = time.perf_counter() - t0
                    t1 = time.perf_counter()
                    qc.predict(x)
                    first = time.perf_counter() - t1
                    t2 = time.perf_counter()
                    qc.predict(x)
                    second = time.perf_counter() - t2
                    figures = rows.setdefault(warm, {"upload": [], "first": [], "second": []})
                    figures["upload"].append(upload)
                    figures["first"].append(first)
                    figures["second"].append(second)
                    qc.close()
            print(f"digits, 1 node, {args.rounds} rounds, medians (s):")
            print("  key upload          first query   second query")
            for warm, figures in rows.items():
                label = "with warm-up   " if warm else "without warm-up"
                print(
                    f"  {label} {statistics.median(figures['upload']):6.2f}   {statistics.median(figures['first']):6.2f}"
                    f"        {statistics.median(figures['second']):6.2f}"
                )
            resumes = []
            for _ in range(args.rounds):
                mc.standby_worker(worker.id)
                t = time.perf_counter()
                mc.resume_worker(worker.id)
                resumes.append(time.perf_counter() - t)
            print(
                f"  resume from standby: median {statistics.median(resumes) * 1000:.0f} ms "
                f"(as the client sees it, polling every 0.25 s)"
            )
            mc.close()


if __name__ == "__main__":
    main()
