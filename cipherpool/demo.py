"""`cipherpool demo`: the whole product on one machine, as each kind of user sees it.

Operator: starts the embedded stack. Provider: trains a digit classifier on scikit-learn's
bundled digits, compiles it to FHE, deploys it, starts a worker, creates a token. End user:
generates keys, uploads the evaluation key, encrypts an image, has the worker compute on the
ciphertext, decrypts, and compares with the model's clear prediction. Then all stops.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cipherpool.client import ManagementClient, QueryClient
from cipherpool.config.settings import Settings
from cipherpool.db import session_scope
from cipherpool.errors import PlatformError
from cipherpool.services.accounts import create_account
from cipherpool.stack.embedded import EmbeddedStack, StackOptions

EXTRA_QUERIES = 3


def run_demo(settings: Settings, demo_dir: Path | None, *, workers: int = 1, echo: Callable[[str], None] = print) -> None:
    temporary = demo_dir is None
    root = Path(tempfile.mkdtemp(prefix="cipherpool-demo-")) if temporary else demo_dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    timings: list[tuple[str, float]] = []

    @contextmanager
    def step(title: str):
        echo(f"• {title} …")
        t = time.perf_counter()
        yield
        timings.append((title, time.perf_counter() - t))
        echo(f"  done in {timings[-1][1]:.2f} s")

    # The demo always runs its own embedded stack, whatever the environment points at.
    settings = settings.model_copy(update={"broker_url": None, "result_backend": None, "store_url": None,
                                           "database_url": None, "data_dir": root / "platform"})
    stack = EmbeddedStack(settings, StackOptions(workers=workers, loglevel="WARNING"))
    try:
        with step("provider: train and compile a digits MLP (scikit-learn digits, 3-bit weights)"):
            from cipherpool.examples import train_digits

            example = train_digits(root / "digits_fhe")
            echo(f"  clear test accuracy {example.accuracy:.1%}; deployment in {example.path}")
        with step(f"operator: start the embedded stack (Redis, control worker, {workers} pool node(s), beat, Flower)"):
            stack.start()
            for name, where in stack.describe():
                echo(f"    {name:<10} {where}")
        with session_scope(settings.effective_database_url()) as session:
            _, api_key = create_account(session, "demo")
        mc = ManagementClient(api_key, broker_url=stack.broker_url, settings=settings)
        with step("provider: deploy and activate the model"):
            mc.deploy_model("digits", example.path)
            mc.activate_model("digits")
        with step("provider: start a worker (binds a pool node, preloads the model)"):
            worker = mc.start_worker("digits")
            echo(f"  worker {worker.id} on {worker.node}: {worker.status.value}")
        token = mc.create_token("demo-user", model="digits")
        qc = QueryClient(token, broker_url=stack.broker_url, settings=settings, key_dir=root / "client-keys")
        with step("end user: generate keys (the secret key stays on this machine)"):
            qc.generate_keys()
        with step("end user: upload the evaluation key (once)"):
            key_id = qc.upload_evaluation_keys()
            echo(f"  evaluation key {key_id[:16]}… ({len(qc.crypto.evaluation_key()) / 1e6:.1f} MB)")
        x, label = example.x_test[0], int(example.y_test[0])
        t = time.perf_counter()
        ciphertext = qc.encrypt(x)
        t_encrypt = time.perf_counter() - t
        t = time.perf_counter()
        output = qc.execute(ciphertext)
        t_execute = time.perf_counter() - t
        server = dict(qc.last_timings)
        t = time.perf_counter()
        decrypted = qc.decrypt(output)
        t_decrypt = time.perf_counter() - t
        clear = example.clear(x.reshape(1, -1))
        predicted, expected = int(decrypted.argmax()), int(clear.argmax())
        echo("")
        echo(f"  predicted digit (decrypted FHE result): {predicted}")
        echo(f"  model's clear prediction:              {expected}")
        echo(f"  true label:                            {label}")
        echo(f"  FHE output equals clear output:        {np.allclose(decrypted, clear, atol=1e-3)}")
        echo(f"  timings: encrypt {t_encrypt * 1e3:.0f} ms ({len(ciphertext)} B) · execute {t_execute:.2f} s "
             f"(queue {server.get('queue_wait_s', 0) * 1e3:.0f} ms, key {server.get('key_s', 0) * 1e3:.0f} ms, "
             f"compute {server.get('compute_s', 0):.2f} s) · decrypt {t_decrypt * 1e3:.0f} ms ({len(output) / 1e3:.0f} kB)")
        if predicted != expected:
            raise PlatformError(f"FHE prediction {predicted} differs from the clear prediction {expected}")
        with step(f"end user: {EXTRA_QUERIES} more queries (the evaluation key is now cached on the node)"):
            for i in range(1, EXTRA_QUERIES + 1):
                got = int(qc.predict(example.x_test[i]).argmax())
                want = int(example.clear(example.x_test[i : i + 1]).argmax())
                echo(f"  image {i}: predicted {got}, clear {want}, execute {qc.last_timings['end_to_end_s']:.2f} s, "
                     f"compute {qc.last_timings['compute_s']:.2f} s")
        stats = mc.worker_stats("digits")[0]
        cache = stats["key_cache"]
        echo(f"  node {stats['node']}: {stats['queries_succeeded']} queries, average compute "
             f"{stats['average_compute_s']:.2f} s, key cache {cache['hits']} hits / {cache['misses']} miss")
        with step("provider: stop the worker"):
            mc.stop_worker(worker.id)
        qc.close()
        mc.close()
    finally:
        echo("• operator: stop the stack")
        stack.stop()
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    echo("")
    echo("step timings:")
    for title, seconds in timings:
        echo(f"  {seconds:7.2f} s  {title}")
