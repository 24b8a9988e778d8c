"""`cipherpool demo`: the whole product on one machine, as each kind of user sees it.

Operator: starts the embedded stack. Provider: trains a digit classifier on scikit-learn's
bundled digits, compiles it to FHE, deploys it, starts a worker, creates a token. End user:
generates keys, uploads the evaluation key, encrypts an image, has the worker compute on the
ciphertext, decrypts, and compares with the model's clear prediction. Provider and end user
talk only to the gateway, over HTTP, like any user. Then all stops.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cipherpool.client import ManagementClient, QueryClient, WorkerInfo
from cipherpool.config.settings import Settings
from cipherpool.errors import PlatformError
from cipherpool.stack.embedded import EmbeddedStack, StackOptions

EXTRA_QUERIES = 3


class Demo:
    def __init__(self, settings: Settings, root: Path, nodes: int, echo: Callable[[str], None]):
        # The demo always runs its own embedded stack, whatever the environment points at.
        self.settings = settings.model_copy(update={
            "broker_url": None, "result_backend": None, "store_url": None, "url": None,
            "database_url": None, "data_dir": root / "platform",
        })
        self.root, self.echo = root, echo
        self.stack = EmbeddedStack(self.settings, StackOptions(nodes=nodes, loglevel="WARNING"))
        self.timings: list[tuple[str, float]] = []

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.echo(f"• {title} …")
        t = time.perf_counter()
        yield
        self.timings.append((title, time.perf_counter() - t))
        self.echo(f"  done in {self.timings[-1][1]:.2f} s")

    def run(self) -> None:
        try:
            self.train()
            with self.step(f"operator: start the embedded stack (Redis, control worker, "
                           f"{self.stack.options.nodes} pool node(s), beat, Flower, gateway)"):
                self.stack.start()
                for name, where in self.stack.describe():
                    self.echo(f"    {name:<10} {where}")
            mc, worker, token = self.provide()
            qc = QueryClient(token, url=self.stack.gateway_url, settings=self.stack.client_settings,
                             key_dir=self.root / "client-keys")
            self.first_query(qc)
            self.more_queries(qc, mc)
            with self.step("provider: stop the worker"):
                mc.stop_worker(worker.id)
            qc.close()
            mc.close()
        finally:
            self.echo("• operator: stop the stack")
            self.stack.stop()
        self.echo("\nstep timings:")
        for title, seconds in self.timings:
            self.echo(f"  {seconds:7.2f} s  {title}")

    def train(self) -> None:
        with self.step("provider: train and compile a digits MLP (scikit-learn digits, 3-bit weights)"):
            from cipherpool.examples import train_digits

            self.example = train_digits(self.root / "digits_fhe")
            self.echo(f"  clear test accuracy {self.example.accuracy:.1%}; deployment in {self.example.path}")

    def provide(self) -> tuple[ManagementClient, WorkerInfo, str]:
        mc = ManagementClient(self.stack.create_account("demo"), url=self.stack.gateway_url,
                              settings=self.stack.client_settings)
        with self.step("provider: deploy and activate the model"):
            mc.deploy_model("digits", self.example.path)
            mc.activate_model("digits")
        with self.step("provider: start a worker (binds a pool node, preloads the model)"):
            worker = mc.start_worker("digits")
            self.echo(f"  worker {worker.id} on {worker.node}: {worker.status.value}")
        return mc, worker, mc.create_token("demo-user", model="digits")

    def first_query(self, qc: QueryClient) -> None:
        with self.step("end user: generate keys (the secret key stays on this machine)"):
            qc.generate_keys()
        with self.step("end user: upload the evaluation key (once), warmed on the node"):
            key_id = qc.upload_evaluation_keys()
            self.echo(f"  key set {key_id[:12]}…, evaluation key {len(qc.crypto.evaluation_key()) / 1e6:.1f} MB")
            if qc.last_warmup is not None:
                self.echo(f"  warmed on {qc.last_warmup.warmed} of {qc.last_warmup.nodes} node(s) in "
                          f"{qc.last_warmup.seconds:.2f} s: one throwaway evaluation, so the first query is warm")
        x, label = self.example.x_test[0], int(self.example.y_test[0])
        t0 = time.perf_counter()
        ciphertext = qc.encrypt(x)
        t1 = time.perf_counter()
        output = qc.execute(ciphertext)
        t2 = time.perf_counter()
        decrypted = qc.decrypt(output)
        t3 = time.perf_counter()
        clear = self.example.clear(x.reshape(1, -1))
        predicted, expected = int(decrypted.argmax()), int(clear.argmax())
        server = qc.last_timings
        self.echo(f"\n  predicted digit (decrypted FHE result): {predicted}")
        self.echo(f"  model's clear prediction:              {expected}")
        self.echo(f"  true label:                            {label}")
        self.echo(f"  FHE output equals clear output:        {np.allclose(decrypted, clear, atol=1e-3)}")
        self.echo(f"  timings: encrypt {(t1 - t0) * 1e3:.0f} ms ({len(ciphertext)} B) · execute {t2 - t1:.2f} s "
                  f"(queue {server['queue_wait_s'] * 1e3:.0f} ms, key {server['key_s'] * 1e3:.0f} ms, "
                  f"compute {server['compute_s']:.2f} s) · decrypt {(t3 - t2) * 1e3:.0f} ms ({len(output) / 1e3:.0f} kB)")
        if predicted != expected:
            raise PlatformError(f"FHE prediction {predicted} differs from the clear prediction {expected}")

    def more_queries(self, qc: QueryClient, mc: ManagementClient) -> None:
        with self.step(f"end user: {EXTRA_QUERIES} more queries (the evaluation key is now cached on the node)"):
            for i in range(1, EXTRA_QUERIES + 1):
                got = int(qc.predict(self.example.x_test[i]).argmax())
                want = int(self.example.clear(self.example.x_test[i: i + 1]).argmax())
                self.echo(f"  image {i}: predicted {got}, clear {want}, execute {qc.last_timings['end_to_end_s']:.2f} s, "
                          f"compute {qc.last_timings['compute_s']:.2f} s")
        stats = mc.worker_stats("digits")[0]
        self.echo(f"  worker {stats.worker_id} on {stats.node}: {stats.queries_succeeded} queries, average compute "
                  f"{stats.average_compute_s or 0:.2f} s, key cache {stats.key_cache_hits} hits / "
                  f"{stats.key_cache_misses} miss")


def run_demo(settings: Settings, demo_dir: Path | None, *, nodes: int = 1, echo: Callable[[str], None] = print) -> None:
    """Run the demo in demo_dir (kept), or in a temporary directory removed afterwards."""
    root = demo_dir.resolve() if demo_dir else Path(tempfile.mkdtemp(prefix="cipherpool-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    previous_tmp, tempfile.tempdir = tempfile.tempdir, str(root / "tmp")  # concrete's compile dirs
    try:
        Demo(settings, root, nodes, echo).run()
    finally:
        tempfile.tempdir = previous_tmp
        if demo_dir is None:
            shutil.rmtree(root, ignore_errors=True)
