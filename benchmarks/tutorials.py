"""The tutorials' wall times: each `cipherpool demo NAME` as a user runs it (a fresh process:
imports, training, the embedded stack's start and stop included), against the target of
under 2 minutes each on 2 cores; and where the time goes (stack, training, keys, queries).

Usage: .venv/bin/python benchmarks/tutorials.py [NAME ...] [--repeats N]   (default: all four, once)
Figures, not assertions: the README's tutorials section quotes them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAMES = ["digits", "health", "image", "sentiment"]
TARGET_S = 120.0


def run(name: str) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory(prefix="cipherpool-bench-") as tmp:
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "cipherpool", "demo", name, "--json", "--out", str(Path(tmp) / "out")],
            capture_output=True,
            text=True,
            timeout=900,
        )
        wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    return wall, json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help=f"of {', '.join(NAMES)} (default: all four)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if unknown := set(args.names) - set(NAMES):
        parser.error(f"no tutorial {', '.join(sorted(unknown))}")
    print(
        f"{'tutorial':<10} {'wall':>7} {'stack':>6} {'train':>6} {'keygen':>7} {'upload':>7} {'queries':>8} "
        f"{'compute/q':>9} {'eval key':>9} {'ct':>8} {'output':>9}  target {TARGET_S:.0f} s"
    )
    for name in args.names or NAMES:
        for _ in range(args.repeats):
            wall, report = run(name)
            t = report["tutorials"][0]
            steps = {s["title"].split(":")[0].split(" (")[0]: s["seconds"] for s in t["steps"]}
            cases = t["cases"]
            queries = sum(c["encrypt_s"] + c["execute_s"] + c["decrypt_s"] for c in cases)
            compute = sum(c["compute_s"] for c in cases) / len(cases)
            counted = f"{len(cases)} quer{'y' if len(cases) == 1 else 'ies'}"
            print(
                f"{name:<10} {wall:6.1f}s {report['stack_start_s']:5.1f}s {steps.get('train and compile', 0):5.1f}s "
                f"{steps.get('generate keys', 0):6.2f}s {steps.get('upload the evaluation key', 0):6.2f}s "
                f"{queries:7.2f}s {compute:8.2f}s {t['evaluation_key_bytes'] / 1e6:7.1f}MB "
                f"{cases[0]['ciphertext_bytes'] / 1e3:6.1f}kB {cases[0]['output_bytes'] / 1e3:8.1f}kB  "
                f"{'ok' if wall < TARGET_S else 'OVER'} ({counted}, agree: {t['agree']}; {t['trained']})",
                flush=True,
            )


if __name__ == "__main__":
    main()
