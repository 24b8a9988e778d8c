"""The layers read top-down: no module imports from a layer above its own, so no package
depends on one that depends on it (docs/architecture.md, "Layers"). A new top-level module or
package must be given its floor here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "cipherpool"

# Bottom first. A module may import from its own floor and the floors below it.
LAYERS: list[set[str]] = [
    {
        "errors",
        "statuses",
        "names",
        "clock",
        "version",
        "files",
        "waiting",
        "credentials",
        "backends",
        "affinity",
    },  # no dependencies (backends: the registry, read by config, db and api; it names its
    # evaluator factories as module:attribute, imported on the nodes, as settings name payment_provider)
    {"config"},  # settings, profiles, Celery configuration
    {"db"},  # tables, engine, migrations (self-contained)
    {"api", "messages"},  # wire types: HTTP schemas, task envelopes
    # what every platform process shares (blobs: the store's backends and a node's disk cache;
    # resultbackend: Celery's, for task states; publishwrites: a Celery publish as Redis writes;
    # brokerredis: kombu's Redis transport, one client object per channel)
    {"store", "blobs", "fhe", "context", "announce", "outages", "inflight", "resultbackend", "publishwrites", "brokerredis"},
    {"billing"},  # money: ledger, rates, charging
    {"services", "workerlog"},  # the platform's decisions on the database
    {"dispatch", "monitoring", "alerts"},  # publishing to nodes; figures; alert rules
    {"lifecycle", "affinity_queues"},  # decisions, then the nodes' messages; key-affinity queues on the broker
    {"workers", "scheduler"},  # the pool node runtime; beat's jobs
    {"tasks", "gateway", "admin"},  # Celery tasks; the HTTP gateway; operator actions
    {"client"},  # HTTP clients (import no platform code: see test_client_imports_no_platform_code)
    {"cli", "stack", "tutorials", "demo", "examples", "__main__", "__init__"},  # entry points
]
FLOOR = {name: i for i, names in enumerate(LAYERS) for name in names}
CLIENT_MAY_IMPORT = {
    "errors",
    "version",
    "config",
    "api",
    "fhe",
    "waiting",
    "client",
    "clock",
    "statuses",
    "names",
    "credentials",
    "files",
    "messages",
}


def _imports() -> list[tuple[str, str, str, int]]:
    """(importing top-level name, imported top-level name, file, line) for every import of
    cipherpool code, function-level ones included."""
    found = []
    for path in ROOT.rglob("*.py"):
        top = path.relative_to(ROOT).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module == "cipherpool":
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cipherpool."):
                names = [node.module.split(".")[1]]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("cipherpool.")]
            found += [(top, name, str(path.relative_to(ROOT.parent)), node.lineno) for name in names]
    return found


def test_every_module_has_a_floor():
    tops = {
        path.relative_to(ROOT).parts[0].removesuffix(".py")
        for path in ROOT.glob("*")
        if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists())
    }
    assert tops - set(FLOOR) == set()


def test_no_import_climbs_against_the_layers():
    climbing = [f"{file}:{line}: {top} imports {name}" for top, name, file, line in _imports() if FLOOR[name] > FLOOR[top]]
    assert climbing == []


def test_client_imports_no_platform_code():
    """A customer's client needs no broker, database or store code."""
    leaking = [
        f"{file}:{line}: imports {name}"
        for top, name, file, line in _imports()
        if top == "client" and name not in CLIENT_MAY_IMPORT
    ]
    assert leaking == []
