"""Run one tutorial through the gateway, as its provider and its end user would, and report
every step: how long it took, where it ran, what crossed the network, and each answer in FHE
beside the model's clear answer.

Everything goes through :class:`ManagementClient` and :class:`QueryClient`, so the tutorial
sees the platform exactly as a user does. A :class:`TrafficLog` watches the end user's HTTP
client: the sizes it reports are what was sent, and it checks that no request body held the
secret key or a clear input.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cipherpool.client import ManagementClient, QueryClient
from cipherpool.client.traffic import TrafficLog
from cipherpool.config.settings import Settings
from cipherpool.tutorials.base import Trained, Tutorial

CLIENT = "end user's machine"
NODE_COMMAND = "provider → gateway → broker (the node's command queue) → pool node"
PROVIDER = "provider's machine"


@dataclass
class Step:
    actor: str  # provider | end user
    title: str
    seconds: float
    where: str  # where it ran
    crossed: str  # what crossed the network, for people
    sent: int = 0  # bytes the client sent in this step (HTTP bodies)
    received: int = 0


@dataclass
class CaseReport:
    label: str
    truth: str | None
    fhe: str
    clear: str
    agree: bool
    values: dict[str, Any]
    encrypt_s: float
    ciphertext_bytes: int
    queue_wait_s: float
    key_s: float
    compute_s: float
    execute_s: float  # submit to encrypted output in hand, as the client saw it
    decrypt_s: float
    output_bytes: int
    node: str | None
    ciphertext_inline: bool = True  # rode in the task message; else by reference through the store
    output_inline: bool = True  # came back in the result; else by reference through the store


@dataclass
class Privacy:
    """What the traffic log saw of the end user's requests."""

    requests: int = 0
    bodies_checked: int = 0
    sent: int = 0
    received: int = 0
    secret_key_bytes: int = 0
    secret_patterns: int = 0
    input_patterns: int = 0
    unchecked_bodies: int = 0
    found: list[str] = field(default_factory=list)  # empty: neither left the client

    @property
    def private(self) -> bool:
        """Every request body was read and none held a guarded secret or input."""
        return not self.found and self.unchecked_bodies == 0 and self.bodies_checked == self.requests


@dataclass
class TutorialReport:
    name: str
    title: str
    model: str
    trained: str
    facts: dict[str, Any]
    steps: list[Step] = field(default_factory=list)
    cases: list[CaseReport] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    privacy: Privacy = field(default_factory=Privacy)
    evaluation_key_bytes: int = 0
    worker: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    queries_after: int = 0  # the queries ran after this many steps (for telling the story in order)

    @property
    def agree(self) -> bool:
        return bool(self.cases) and all(c.agree for c in self.cases)

    @property
    def private(self) -> bool:
        return self.privacy.private

    def to_dict(self) -> dict[str, Any]:
        document = {**asdict(self), "agree": self.agree, "private": self.private}
        document["privacy"]["private"] = self.private
        return document


def size(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


class TutorialRun:
    def __init__(
        self,
        tutorial: Tutorial,
        *,
        api_key: str,
        url: str,
        settings: Settings,
        work_dir: Path,
        out_dir: Path | None = None,
        echo: Callable[[str], None] = print,
        explain: bool = False,
    ):
        self.tutorial, self.work_dir, self.out_dir, self.echo = tutorial, work_dir, out_dir, echo
        # ``explain``: each step's end line also says where it ran and what crossed the network,
        # and the lines the report prints again (answers, the trained model) are left out, so
        # that a tutorial fits one screen (demo --explain).
        self.explain = explain
        self.url, self.settings = url, settings
        self.mc = ManagementClient(api_key, url=url, settings=settings)
        self.provider_log, self.log = TrafficLog(), TrafficLog()
        self.mc.observe(self.provider_log)
        self.report = TutorialReport(tutorial.name, tutorial.title, tutorial.model, "", {})
        self.worker_node: str | None = None  # from the provider's view: end users are never told node names

    @contextmanager
    def step(self, actor: str, title: str, where: str, log: TrafficLog | None = None) -> Iterator[Step]:
        """Time a step; the traffic of ``log`` during it is the step's. The body fills in
        ``crossed`` (and may refine ``where``)."""
        self.echo(f"  {actor}: {title} …")
        mark = log.mark() if log else 0
        started = time.perf_counter()
        step = Step(actor, title, 0.0, where, "nothing")
        yield step
        step.seconds = time.perf_counter() - started
        if log:
            totals = log.since(mark)
            step.sent, step.received = totals.sent, totals.received
        self.report.steps.append(step)
        if self.explain:
            traffic = f" [{size(step.sent)} up, {size(step.received)} down]" if step.sent or step.received else ""
            self.echo(f"      {step.seconds:.2f} s · where: {step.where} · crossed: {step.crossed}{traffic}")
        else:
            self.echo(f"    {step.seconds:.2f} s")

    def run(self) -> TutorialReport:
        started = time.perf_counter()
        name = self.tutorial.name
        with self.step("provider", f"train and compile: {self.tutorial.model}", PROVIDER) as step:
            trained = self.tutorial.train(self.work_dir / f"{name}_fhe")
            self.report.trained, self.report.facts = trained.summary, trained.facts
            if not self.explain:
                self.echo(f"    {trained.summary}")
        worker_id = self.provide(trained)
        try:
            self.query(trained)
        finally:
            with self.step("provider", "stop the worker", NODE_COMMAND) as step:
                self.mc.stop_worker(worker_id)
                step.crossed = (
                    "the worker's id, on the node's command queue; the node lets in-flight queries "
                    "finish, unloads the model and frees its slot"
                )
            self.mc.close()
        self.report.seconds = time.perf_counter() - started
        return self.report

    def provide(self, trained: Trained) -> str:
        name = self.tutorial.name
        with self.step("provider", f"deploy model {name!r} and activate it", "provider → gateway", self.provider_log) as step:
            self.mc.deploy_model(name, trained.path, description=self.tutorial.title)
            self.mc.activate_model(name)
            step.crossed = (
                f"the deployment, {size(self.provider_log.since(0).sent)}: the compiled circuit "
                "(server.zip) and the client specs (client.zip); no data"
            )
        with self.step("provider", "start a worker (binds a pool node, preloads the model)", NODE_COMMAND) as step:
            worker = self.mc.start_worker(name)
            self.worker_node = worker.node
            step.where = f"{NODE_COMMAND} {worker.node}"
            step.crossed = (
                "the worker's id, on the node's command queue; the node loads the circuit from the "
                "platform's store and starts consuming the model's queue"
            )
            if not self.explain:  # else its where names the node
                self.echo(f"    worker {worker.id} on {worker.node}: {worker.status.value}")
        with self.step("provider", "create an access token for the end user", "gateway") as step:
            self.token = self.mc.create_token(f"{name}-user", model=name)
            step.crossed = "the token's value, once, to the provider (the platform keeps only its hash)"
        return worker.id

    def query(self, trained: Trained) -> None:
        name, log, privacy = self.tutorial.name, self.log, self.report.privacy
        qc = QueryClient(self.token, url=self.url, settings=self.settings, key_dir=self.work_dir / "client-keys" / name)
        qc.observe(log)
        try:
            with self.step("end user", "fetch the model's client specs", "end user → gateway", log) as step:
                mark = log.mark()
                shape = qc.crypto.input_shape  # the model's description and client.zip, checked against its digest
                step.crossed = (
                    f"down, the client specs (client.zip: input shape {shape}, quantization, encryption "
                    f"parameters; {size(log.since(mark).received)} with the model's description); up, "
                    "only the token"
                )
            with self.step("end user", "generate keys", CLIENT) as step:
                qc.generate_keys()
                secret = qc.crypto.secret_key_material()
                privacy.secret_key_bytes = sum(len(s) for s in secret)
                privacy.secret_patterns = sum(log.guard("the secret key", s) for s in secret)
                evaluation_key = len(qc.crypto.evaluation_key())
                self.report.evaluation_key_bytes = evaluation_key
                step.crossed = (
                    f"nothing: the secret key ({size(privacy.secret_key_bytes)}) stays in {qc.key_dir} "
                    f"(0700); the evaluation key is {size(evaluation_key)}"
                )
            with self.step(
                "end user",
                "upload the evaluation key (once) and warm it on the node",
                "end user → gateway → store; pool node",
                log,
            ) as step:
                qc.upload_evaluation_keys()
                warm = qc.last_warmup
                step.crossed = (
                    f"the evaluation key, {size(evaluation_key)}: it lets a node compute on this "
                    "user's ciphertexts, not decrypt them"
                )
                if warm is not None:
                    step.crossed += (
                        f"; one ciphertext of zeros, evaluated once on {warm.warmed} of {warm.nodes} "
                        f"node(s) in {warm.seconds:.2f} s so that the first query finds the key ready"
                    )
            cases = self.tutorial.cases()
            self.report.queries_after = len(self.report.steps)
            decrypted = [self.one_case(qc, trained, case) for case in cases]
            totals = log.since(0)
            privacy.requests, privacy.sent, privacy.received = totals.requests, totals.sent, totals.received
            privacy.bodies_checked, privacy.found = log.checked_bodies, list(log.found)
            privacy.unchecked_bodies = log.unchecked_bodies
            self.report.files = self.tutorial.finish(cases, decrypted, self.out_dir)
            stats = self.mc.worker_stats(name)
            if stats:
                s = stats[0]
                self.report.worker = {
                    "worker": s.worker_id,
                    "node": s.node,
                    "queries": s.queries_succeeded,
                    "average_compute_s": s.average_compute_s,
                    "key_cache_hits": s.key_cache_hits,
                    "key_cache_misses": s.key_cache_misses,
                }
        finally:
            qc.close()

    def one_case(self, qc: QueryClient, trained: Trained, case: Any) -> Any:
        privacy, log = self.report.privacy, self.log
        raw = np.ascontiguousarray(case.x).tobytes()
        if len(set(raw)) > 1:  # the input's exact bytes, whole; a constant input could match by chance
            privacy.input_patterns += log.guard(f"the clear input of {case.label!r}", raw, whole=True)
        t0 = time.perf_counter()
        ciphertext = qc.encrypt(case.x)
        t1 = time.perf_counter()
        output = qc.execute(ciphertext)
        t2 = time.perf_counter()
        result = qc.decrypt(output)
        t3 = time.perf_counter()
        clear = trained.clear(np.asarray(case.x)[np.newaxis])
        reading = self.tutorial.read(case, result, clear)
        server = qc.last_timings
        report = CaseReport(
            case.label,
            case.truth,
            reading.fhe,
            reading.clear,
            reading.agree,
            reading.values,
            t1 - t0,
            len(ciphertext),
            server.get("queue_wait_s", 0.0),
            server.get("key_s", 0.0),
            server.get("compute_s", 0.0),
            t2 - t1,
            t3 - t2,
            len(output),
            self.worker_node,
            ciphertext_inline=len(ciphertext) <= self.settings.inline_max_bytes,
            output_inline=len(output) <= self.settings.inline_max_bytes,
        )
        self.report.cases.append(report)
        self.echo(
            f"  end user: {case.label}: encrypt {report.encrypt_s * 1e3:.0f} ms ({size(report.ciphertext_bytes)}) · "
            f"queue {report.queue_wait_s * 1e3:.0f} ms · compute {report.compute_s:.2f} s · "
            f"decrypt {report.decrypt_s * 1e3:.0f} ms ({size(report.output_bytes)})"
        )
        if self.explain:  # the answers follow in the report, FHE beside clear
            return result
        self.echo(
            f"    FHE:   {reading.fhe}\n    clear: {reading.clear}"
            + (f"\n    truth: {case.truth}" if case.truth else "")
            + f"\n    {'agree' if reading.agree else 'DISAGREE'}"
        )
        return result
