"""`cipherpool demo`: the four tutorials end to end on an embedded stack of their own.

Operator: starts the stack (Redis, SQLite, control worker, pool node, beat, Flower, gateway).
Then, per tutorial (:mod:`cipherpool.tutorials`), the provider trains a model on data that a
package ships, compiles it to FHE, deploys it, starts a worker and creates a token; the end
user generates keys, uploads the evaluation key, encrypts each input, has the worker compute
on the ciphertext, decrypts, and compares with the model's clear answer. Provider and end user
talk only to the gateway, over HTTP, like any user. Then all stops.

A disagreement between FHE and clear fails the demo after its report (``FheMismatch``, exit
status 7), and so does a request body that held the secret key or a clear input, or that could
not be checked (``PrivacyBreach``, exit status 7). Bad arguments (``--text`` that the model
cannot read, an ``--out`` that cannot be written) are refused before anything starts.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from cipherpool.config.settings import Settings
from cipherpool.errors import FheMismatch, InvalidInput, PrivacyBreach
from cipherpool.files import private_dir
from cipherpool.stack.embedded import EmbeddedStack, StackOptions
from cipherpool.tutorials import DEFAULT, TUTORIALS, Tutorial
from cipherpool.tutorials.present import explain, summary
from cipherpool.tutorials.runner import TutorialReport, TutorialRun
from cipherpool.tutorials.sentiment import Sentiment, check_texts
from cipherpool.version import __version__

ORDER = list(TUTORIALS)  # digits, health, image, sentiment


def choose(names: Sequence[str]) -> list[str]:
    """The tutorials to run, in the canonical order: none named runs the quick default."""
    wanted = set(names) or {DEFAULT}
    return ORDER if "all" in wanted else [n for n in ORDER if n in wanted]


def make(name: str, texts: Sequence[str]) -> Tutorial:
    return Sentiment(list(texts)) if name == "sentiment" else TUTORIALS[name]()


class Demo:
    def __init__(
        self,
        settings: Settings,
        root: Path,
        *,
        nodes: int,
        names: list[str],
        texts: Sequence[str] = (),
        out_dir: Path | None = None,
        echo: Callable[[str], None] = print,
        explain: bool = False,
    ):
        # The demo always runs its own embedded stack, whatever the environment points at.
        self.settings = settings.model_copy(
            update={
                "broker_url": None,
                "result_backend": None,
                "store_url": None,
                "url": None,
                "database_url": None,
                "data_dir": root / "platform",
            }
        )
        self.root, self.names, self.texts, self.out_dir = root, names, texts, out_dir
        self.echo, self.explain = echo, explain
        self.stack = EmbeddedStack(self.settings, StackOptions(nodes=nodes, loglevel="WARNING"))
        self.stack_s = 0.0

    def run(self) -> list[TutorialReport]:
        reports: list[TutorialReport] = []
        try:
            self.echo(
                f"• operator: start the embedded stack (Redis, control worker, {self.stack.options.nodes} pool "
                "node(s), beat, Flower, gateway) …"
            )
            started = time.perf_counter()
            self.stack.start()
            self.stack_s = time.perf_counter() - started
            for name, where in self.stack.describe():
                self.echo(f"    {name:<10} {where}")
            self.echo(f"    ready in {self.stack_s:.2f} s")
            api_key = self.stack.create_account("demo")
            for name in self.names:
                self.echo(f"\n• tutorial {name}: {TUTORIALS[name].title}")
                run = TutorialRun(
                    make(name, self.texts),
                    api_key=api_key,
                    url=self.stack.gateway_url,
                    settings=self.stack.client_settings,
                    work_dir=self.root / name,
                    out_dir=self.out_dir / name if self.out_dir else None,
                    echo=self.echo,
                    explain=self.explain,
                )
                report = run.run()
                reports.append(report)
                self.echo("")
                for line in summary(report, explained=self.explain) + (explain(report) if self.explain else []):
                    self.echo(line)
        finally:
            self.echo("\n• operator: stop the stack")
            self.stack.stop()
        if len(reports) > 1:
            self.echo("\nall tutorials:")
            for r in reports:
                self.echo(
                    f"  {r.name:<10} {r.seconds:6.1f} s  {len(r.cases)} queries  "
                    f"{'FHE agrees with clear on every one' if r.agree else 'DISAGREEMENT'}"
                )
        return reports


def as_json(reports: list[TutorialReport], stack_s: float, total_s: float) -> str:
    document: dict[str, Any] = {
        "cipherpool": __version__,
        "stack_start_s": stack_s,
        "seconds": total_s,
        "agree": all(r.agree for r in reports),
        "private": all(r.private for r in reports),
        "tutorials": [r.to_dict() for r in reports],
    }
    return json.dumps(_plain(document), indent=2, allow_nan=False)


def _plain(value: Any) -> Any:
    """Strict JSON: numpy scalars and arrays become numbers and lists, a non-finite number
    (a PSNR of identical images) becomes null, anything else unknown its string."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy scalar or array
        return _plain(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def prepare(chosen: list[str], texts: Sequence[str], out_dir: Path | None) -> None:
    """Refuse what would fail later, before a process starts or a model trains."""
    if texts and "sentiment" not in chosen:
        raise InvalidInput('--text is for the sentiment tutorial: `cipherpool demo sentiment --text "..."`.')
    if texts:
        check_texts(list(texts))
    if out_dir is not None:
        for name in chosen:
            if TUTORIALS[name].writes_files:
                where = out_dir / name
                try:
                    private_dir(where)
                    probe = where / ".cipherpool-write-test"
                    probe.touch(mode=0o600)
                    probe.unlink()
                except OSError as e:
                    raise InvalidInput(
                        f"The demo cannot write its files to {where}: {e.strerror or e}. Choose another directory with --out."
                    ) from e


def run_demo(
    settings: Settings,
    demo_dir: Path | None,
    *,
    nodes: int = 1,
    names: Sequence[str] = (),
    texts: Sequence[str] = (),
    out_dir: Path | None = None,
    explain: bool = False,
    json_out: bool = False,
    echo: Callable[[str], None] = print,
) -> list[TutorialReport]:
    """Run the chosen tutorials in demo_dir (kept), or in a temporary directory removed
    afterwards. With ``json_out`` the progress goes to stderr and one JSON document to ``echo``."""
    chosen = choose(names)
    prepare(chosen, texts, out_dir)
    root = demo_dir.resolve() if demo_dir else Path(tempfile.mkdtemp(prefix="cipherpool-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    previous_tmp, tempfile.tempdir = tempfile.tempdir, str(root / "tmp")  # concrete's compile dirs
    started = time.perf_counter()
    try:
        progress = _to_stderr if json_out else echo
        demo = Demo(
            settings,
            root,
            nodes=nodes,
            names=chosen,
            texts=texts,
            out_dir=out_dir,
            echo=progress,
            explain=explain and not json_out,
        )
        with stdout_to_stderr() if json_out else nullcontext():
            reports = demo.run()
    finally:
        tempfile.tempdir = previous_tmp
        if demo_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if json_out:
        echo(as_json(reports, demo.stack_s, time.perf_counter() - started))
    leaks = [f"{r.name}: {', '.join(r.privacy.found) or 'unchecked bodies'}" for r in reports if not r.private]
    if leaks:
        raise PrivacyBreach(f"The traffic check failed for {'; '.join(leaks)}")
    wrong = [f"{r.name}: {c.label!r}" for r in reports for c in r.cases if not c.agree]
    if wrong:
        raise FheMismatch(f"FHE and clear answers differ for {', '.join(wrong)}")
    return reports


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout meanwhile to stderr, at the file-descriptor level:
    concrete's native code prints to stdout too (``KeySetCache: miss``), and ``--json`` promises
    one JSON document there."""
    _flush_stdout()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        try:
            yield
        finally:
            _flush_stdout()
            os.dup2(saved, 1)
    finally:
        os.close(saved)


def _flush_stdout() -> None:
    """Flush Python's buffer and C's (native code writes through stdio), so that nothing
    written before a swap of fd 1 lands on the other side of it."""
    sys.stdout.flush()
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to reach: Python's own flush is all there is
        pass
