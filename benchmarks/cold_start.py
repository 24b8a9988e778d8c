"""Cold start: start_worker until the worker is up, on a pool node that is already running.

Runs an embedded stack of one node twice, with the concrete import at node start
(``CIPHERPOOL_NODE_PRELOAD=true``, the default) and without it (the import then happens at the
first bind), and starts the digits model three times in each: the first start is the cold
one, the next two rebind a node that has imported concrete already.

Usage: .venv/bin/python benchmarks/cold_start.py [--model DIR]   (default: train the digits MLP)
Figures, not assertions: docs/performance.md quotes them (target <= 2 s).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def starts(path: Path, preload: bool, n: int = 3) -> list[float]:
    from cipherpool.client import ManagementClient
    from cipherpool.config.settings import Settings
    from cipherpool.stack.embedded import EmbeddedStack, StackOptions

    with tempfile.TemporaryDirectory(prefix="cipherpool-cold-") as tmp:
        settings = Settings(data_dir=Path(tmp), node_preload=preload)
        with EmbeddedStack(settings, StackOptions(nodes=1, beat=False, flower=False)) as stack:
            mc = ManagementClient(stack.create_account("bench"), settings=stack.client_settings)
            mc.deploy_model("m", path)
            mc.activate_model("m")
            times = []
            for _ in range(n):
                started = time.perf_counter()
                worker = mc.start_worker("m")
                times.append(time.perf_counter() - started)
                mc.stop_worker(worker.id)
            mc.close()
            return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a FHEModelDev(...).save() directory (default: digits MLP)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cipherpool-cold-model-") as tmp:
        path = args.model
        if path is None:
            from cipherpool.examples import train_digits

            path = train_digits(Path(tmp) / "digits").path
        print("start_worker -> up on a running node (first start cold, then two rebinds):")
        for preload in (True, False):
            figures = ", ".join(f"{t:.2f} s" for t in starts(path, preload))
            print(f"  concrete imported {'at node start' if preload else 'at first bind '}   {figures}")


if __name__ == "__main__":
    main()
