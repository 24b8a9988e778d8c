"""`cipherpool worker stop` by model (one, or --all), through CliRunner with a stand-in client."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cipherpool.api.schemas import WorkerOut
from cipherpool.cli import cli
from cipherpool.cli.context import CliContext
from cipherpool.errors import BelowMinimum, WorkerNotFound
from cipherpool.statuses import WorkerStatus


def _worker(worker_id: str, model: str, status: WorkerStatus, started_at: str) -> WorkerOut:
    return WorkerOut(
        id=worker_id,
        model=model,
        node=f"node-{worker_id}",
        node_status="online",
        status=status,
        error=None,
        created_at=started_at,
        started_at=started_at,
        stopped_at=None,
    )


class FakeManagement:
    def __init__(self, workers: list[WorkerOut], refuse: set[str] = frozenset()):
        self.workers, self.refuse, self.stopped = workers, refuse, []

    def list_workers(self, model=None):
        return [w for w in self.workers if model is None or w.model == model]

    def stop_worker(self, worker_id):
        if worker_id in self.refuse:
            raise BelowMinimum(f"Stopping {worker_id} would leave fewer workers than the model's minimum.")
        self.stopped.append(worker_id)
        found = next(w for w in self.workers if w.id == worker_id)
        return found.model_copy(update={"status": WorkerStatus.STOPPED})

    def close(self):
        pass


@pytest.fixture
def fake(monkeypatch):
    mc = FakeManagement(
        [
            _worker("w-old", "digits", WorkerStatus.UP, "2030-01-01T10:00:00"),
            _worker("w-new", "digits", WorkerStatus.UP, "2030-01-01T11:00:00"),
            _worker("w-gone", "digits", WorkerStatus.STOPPED, "2030-01-01T12:00:00"),
            _worker("w-other", "health", WorkerStatus.UP, "2030-01-01T09:00:00"),
        ]
    )
    monkeypatch.setattr(CliContext, "management", lambda self: mc)
    return mc


def run(*args: str):
    return CliRunner().invoke(cli, ["--url", "http://127.0.0.1:1", "--api-key", "cpk_x", "worker", "stop", *args])


def test_stop_by_model_stops_its_newest_running_worker(fake):
    result = run("--model", "digits", "--json")
    assert result.exit_code == 0, result.output
    assert fake.stopped == ["w-new"] and json.loads(result.stdout)["id"] == "w-new"


def test_stop_by_model_all_stops_every_running_worker_of_it(fake):
    result = run("--model", "digits", "--all", "--json")
    assert result.exit_code == 0, result.output
    assert fake.stopped == ["w-new", "w-old"]  # not the stopped one, nor another model's
    assert [w["id"] for w in json.loads(result.stdout)] == ["w-new", "w-old"]


def test_stop_by_id_still_works(fake):
    assert run("w-other").exit_code == 0 and fake.stopped == ["w-other"]


def test_a_model_without_running_workers_says_so(fake):
    fake.workers = [w for w in fake.workers if w.model != "digits" or w.status == WorkerStatus.STOPPED]
    result = run("--model", "digits", "--all")
    assert result.exit_code == WorkerNotFound.exit_code, result.output
    assert "Model 'digits' has no running worker to stop" in result.stderr
    assert fake.stopped == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "Give a WORKER_ID or --model NAME"),
        (["w-new", "--model", "digits"], "one of the two"),
        (["--all"], "give --model NAME"),
        (["w-new", "--all"], "give --model NAME"),
    ],
)
def test_stop_needs_exactly_one_of_an_id_and_a_model(fake, args, message):
    result = run(*args)
    assert result.exit_code == 2 and message in result.output
    assert fake.stopped == []


def test_a_refusal_midway_says_what_was_stopped(fake):
    fake.refuse = {"w-old"}
    result = run("--model", "digits", "--all")
    assert result.exit_code == BelowMinimum.exit_code
    assert "stopped w-new before this refusal" in result.stderr and "below_min_workers" in result.stderr
