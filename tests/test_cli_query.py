"""`cipherpool query`: input files (CSV, a header, separators, NaN, shape), --output formats,
keys uploaded as needed (and after a new model version), and errors in the CLI's words. A fake
gateway (httpx's MockTransport) and a fake of concrete's client stand in: no stack, no concrete."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from cipherpool.cli import cli
from cipherpool.cli.arrays import read_rows
from cipherpool.cli.context import CliContext
from cipherpool.cli.wording import for_cli, python_words
from cipherpool.client import query as query_module
from cipherpool.client.query import QueryClient
from cipherpool.config.settings import Settings
from cipherpool.errors import InvalidInput, InvalidShape
from cipherpool.files import private_dir
from cipherpool.messages import ITEM, EncryptedInput, EncryptedOutput, pack_batch, unpack_batch

MODEL_ID = "mdl_digits"


class FakeCrypto:
    """concrete's client, faked: keys are a random id in key_dir; a 'ciphertext' is the
    sample's bytes; decrypting gives ten scores with the sample's sum mod 10 ahead."""

    loaded = 0

    def __init__(self, client_zip: bytes, key_dir: Path):
        FakeCrypto.loaded += 1
        self.key_dir = Path(key_dir)
        private_dir(self.key_dir)
        self.input_shape = json.loads(client_zip)["input_shape"]

    def generate_keys(self, force: bool = False) -> str:
        path = self.key_dir / "key_id"
        if force or not path.exists():
            path.write_text(uuid.uuid4().hex)
        return path.read_text()

    def key_id(self) -> str:
        return self.generate_keys()

    def evaluation_key(self) -> bytes:
        return b"evaluation key"

    def encrypt(self, x: Any) -> bytes:
        sample = np.asarray(x, dtype=np.float64)
        if len(self.input_shape) > 2 and list(sample.shape) != self.input_shape[1:]:  # as concrete refuses it
            raise InvalidShape(f"Input of shape {sample.shape} does not fit this model.")
        return sample.tobytes()

    def decrypt(self, data: bytes) -> np.ndarray:
        scores = np.zeros((1, 10))
        scores[0, int(np.frombuffer(data, dtype=np.float64).sum()) % 10] = 1.0
        return scores


class FakeGateway:
    """The end user's routes of the gateway for one model, whose version the test moves on."""

    def __init__(self) -> None:
        self.version = 1
        self.input_shape = [1, 4]
        self.keys: dict[str, int] = {}  # key id -> the version it was made for
        self.queries = 0
        self.outputs: dict[str, bytes] = {}
        self.refused: list[str] = []
        self.batches: list[int] = []  # each batch's item count, in order
        self.compute_per_item_s = 0.0  # what the batches' timings say the node spent per item

    @property
    def client_zip(self) -> bytes:
        return json.dumps({"version": self.version, "input_shape": self.input_shape}).encode()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/client/model":
            return httpx.Response(
                200,
                json={
                    "id": MODEL_ID,
                    "name": "digits",
                    "status": "active",
                    "version": self.version,
                    "concrete_ml": "1.9.0",
                    "concrete_python": "2.10.0",
                    "client_zip_sha256": hashlib.sha256(self.client_zip).hexdigest(),
                    "running_workers": 1,
                    "input_shape": self.input_shape,
                },
            )
        if path == "/v1/client/model/client.zip":
            return httpx.Response(200, content=self.client_zip)
        if path.startswith("/v1/client/keys/") and request.method == "PUT":
            key_id = path.rsplit("/", 1)[1]
            self.keys[key_id] = self.version
            return httpx.Response(200, json={"key_id": key_id, "blob_id": "b" * 64, "size_bytes": 14})
        if path == "/v1/queries" and request.method == "POST":
            envelope = EncryptedInput.decode(request.content)
            made_for = self.keys.get(envelope.key_id)
            if made_for is None:
                self.refused.append("evaluation_key_not_found")
                return httpx.Response(404, json={"code": "evaluation_key_not_found", "message": "No evaluation key."})
            if made_for != self.version:
                self.refused.append("keys_outdated")
                message = f"These keys were made for version {made_for}; model 'digits' serves version {self.version}."
                return httpx.Response(409, json={"code": "keys_outdated", "message": message})
            self.queries += 1
            query_id = f"q{self.queries}"
            self.outputs[query_id] = EncryptedOutput(MODEL_ID, envelope.key_id, envelope.data).encode()
            if "wait" not in request.url.params:  # submitted, to be polled
                return httpx.Response(202, json={"id": query_id, "status": "queued"})
            return self._result(query_id)
        if path == "/v1/queries/batch" and request.method == "POST":  # a batch: one query id, framed answers
            items = [EncryptedInput.decode(data) for _, data in unpack_batch(request.content, 1000)]
            made_for = self.keys.get(items[0].key_id)
            if made_for is None:
                self.refused.append("evaluation_key_not_found")
                return httpx.Response(404, json={"code": "evaluation_key_not_found", "message": "No evaluation key."})
            if made_for != self.version:
                self.refused.append("keys_outdated")
                message = f"These keys were made for version {made_for}; model 'digits' serves version {self.version}."
                return httpx.Response(409, json={"code": "keys_outdated", "message": message})
            self.queries += len(items)
            query_id = f"b{self.queries}"
            self.outputs[query_id] = pack_batch([(ITEM, EncryptedOutput(MODEL_ID, e.key_id, e.data).encode()) for e in items])
            self.batches.append(len(items))
            return httpx.Response(202, json={"id": query_id, "status": "queued"})
        if path.startswith("/v1/queries/") and request.method == "GET":
            return self._result(path.rsplit("/", 1)[1])
        return httpx.Response(404, json={"code": "not_found", "message": f"No route {request.method} {path}"})

    def _result(self, query_id: str) -> httpx.Response:
        headers = {"x-cipherpool-query": query_id, "x-cipherpool-model-version": str(self.version)}
        if query_id.startswith("b"):
            items = len(unpack_batch(self.outputs[query_id], 1000))
            headers["x-cipherpool-timings"] = json.dumps({"compute_s": self.compute_per_item_s * items, "server_total_s": 1.0})
        return httpx.Response(200, content=self.outputs[query_id], headers=headers)


@pytest.fixture
def gateway(monkeypatch) -> Iterator[FakeGateway]:
    monkeypatch.setattr(query_module, "ClientCrypto", FakeCrypto)
    FakeCrypto.loaded = 0
    yield FakeGateway()


def client_of(gateway: FakeGateway, key_dir: Path) -> QueryClient:
    """A new QueryClient on the fake gateway, as a new CLI process makes one."""
    settings = Settings(data_dir=key_dir.parent, url="http://gateway", client_lean_http=False)  # all through the mock
    client = QueryClient("cpt_user", settings=settings, key_dir=key_dir)
    client._t._http._transport = httpx.MockTransport(gateway)
    return client


@pytest.fixture
def cli_client(gateway, tmp_path, monkeypatch):
    """`cipherpool query …` gets a client on the fake gateway (a new one per command)."""
    made: list[QueryClient] = []

    def make(self, key_dir, model=None):
        made.append(client_of(gateway, tmp_path / "keys"))
        return made[-1]

    monkeypatch.setattr(CliContext, "query", make)
    return made


def run(*args: str):
    return CliRunner().invoke(cli, ["--url", "http://gateway", "query", "--token", "cpt_user", *args])


# ---- input files --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "1,2,3,4\n5,6,7,8\n",
        "a,b,c,d\n1,2,3,4\n5,6,7,8\n",  # a header row
        "1;2;3;4\n5;6;7;8\n",  # semicolons
        "f1;f2;f3;f4\n1,0;2;3;4\n5;6;7;8,0\n",  # semicolons with decimal commas, and a header
        "1 2 3 4\n\n5\t6 7 8\n",  # white space, a blank line
        '"1","2","3","4"\n"5","6","7","8"\n',  # quoted cells
    ],
)
def test_csv_rows_are_read_with_a_header_and_either_separator(tmp_path, text):
    path = tmp_path / "x.csv"
    path.write_text(text)
    rows = read_rows(path)
    np.testing.assert_array_equal(rows.values, [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert bool(rows.notes) == text[0].isalpha()  # a skipped header is said


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("", "is empty: no rows to query"),
        ("\n  \n", "is empty: no rows to query"),
        ("a,b,c\n", "has a header row (a, b, c) and no rows of numbers under it"),
        ("1,2,3,4\n5,6,7\n", "row 2 has 3 columns; row 1 has 4"),
        ("1,2,,4\n", "row 1, column 3 is empty"),
        ("x,y,z,w\n1,2,nan,4\n", "row 2, column 3 is NaN"),
        ("1,2,3,4\n1,inf,3,4\n", "row 2, column 2 is infinite"),
        ("1,2,3,4\n1,two,3,4\n", "row 2, column 2 is not a number: 'two'"),
    ],
)
def test_bad_csv_is_refused_with_one_clear_line(tmp_path, text, said):
    path = tmp_path / "x.csv"
    path.write_text(text)
    with pytest.raises(InvalidInput, match=f"{re.escape(str(path))}:? .*{re.escape(said)}"):
        read_rows(path)


def test_every_problem_has_its_line_up_to_a_few(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("1,2,3,4\n" + "".join(f"{i},nan,3,4\n" for i in range(9)))
    with pytest.raises(InvalidInput) as refused:
        read_rows(path)
    lines = refused.value.message.splitlines()
    assert lines[1:3] == ["  row 2, column 2 is NaN", "  row 3, column 2 is NaN"] and lines[-1] == "  … and 4 more"


def test_predict_checks_the_columns_against_the_model_before_loading_concrete(gateway, cli_client, tmp_path):
    gateway.version = 2
    (tmp_path / "x.csv").write_text("1,2,3,4\n1,2,3\n")
    ragged = run("predict", "--input", str(tmp_path / "x.csv"))
    assert ragged.exit_code == InvalidInput.exit_code and "row 2 has 3 columns; row 1 has 4" in ragged.stderr
    (tmp_path / "x.csv").write_text("1,2,3,4,5,6\n1,2,3,4,5,6\n1,2,3,4,5,6\n")
    wide = run("predict", "--input", str(tmp_path / "x.csv"))
    assert wide.exit_code == InvalidInput.exit_code, wide.output
    assert "row 1 has 6 columns (as has every other row, 2 more); model digits v2 takes 4" in wide.stderr
    assert FakeCrypto.loaded == 0 and gateway.queries == 0  # concrete never loaded, nothing sent
    (tmp_path / "x.csv").write_text("")
    assert "is empty" in run("predict", "--input", str(tmp_path / "x.csv")).stderr


def test_predict_reads_a_csv_with_a_header_and_says_so(gateway, cli_client, tmp_path):
    (tmp_path / "x.csv").write_text("p0;p1;p2;p3\n1;2;3;0\n0;0;0;7\n")
    result = run("predict", "--input", str(tmp_path / "x.csv"), "--json")
    assert result.exit_code == 0, result.output
    assert "cipherpool: skipped the header row of x.csv (p0, p1, p2, p3)" in result.stderr
    assert json.loads(result.stdout)["argmax"] == [6, 7] and gateway.queries == 2


def test_an_image_model_takes_each_csv_row_as_one_image(gateway, cli_client, tmp_path):
    gateway.input_shape = [1, 1, 2, 2]
    (tmp_path / "x.csv").write_text("1,1,1,0\n")
    result = run("predict", "--input", str(tmp_path / "x.csv"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["argmax"] == [3]


# ---- --output ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["y.csv", "y.npy", "y.json", "Y.CSV"])
def test_predict_writes_the_format_its_output_extension_says(gateway, cli_client, tmp_path, name):
    (tmp_path / "x.csv").write_text("1,2,3,0\n0,0,0,7\n")
    target = tmp_path / name
    result = run("predict", "--input", str(tmp_path / "x.csv"), "--output", str(target))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.lower().startswith("y")) == [name]  # not y.csv.npy
    assert target.stat().st_mode & 0o777 == 0o600
    expected = np.zeros((2, 10))
    expected[0, 6] = expected[1, 7] = 1
    if name.lower().endswith(".csv"):
        np.testing.assert_array_equal(np.loadtxt(target, delimiter=","), expected)
    elif name.endswith(".npy"):
        np.testing.assert_array_equal(np.load(target), expected)
    else:
        assert json.loads(target.read_text()) == {"result": expected.tolist(), "argmax": [6, 7]}


def test_an_unknown_output_extension_is_refused_before_any_query(gateway, cli_client, tmp_path):
    (tmp_path / "x.csv").write_text("1,2,3,4\n")
    for name in ("y.txt", "y"):
        result = run("predict", "--input", str(tmp_path / "x.csv"), "--output", str(tmp_path / name))
        assert result.exit_code == 2 and ".csv (CSV), .npy (NumPy), .json (JSON)" in result.output
    assert gateway.queries == 0 and cli_client == []


def test_an_existing_output_file_becomes_private(gateway, cli_client, tmp_path):
    (tmp_path / "x.csv").write_text("1,2,3,4\n")
    (tmp_path / "y.json").write_text("old")
    (tmp_path / "y.json").chmod(0o644)
    assert run("predict", "--input", str(tmp_path / "x.csv"), "--output", str(tmp_path / "y.json")).exit_code == 0
    assert (tmp_path / "y.json").stat().st_mode & 0o777 == 0o600


# ---- keys: uploaded when needed, and after a new model version -------------------------------


def test_predict_generates_and_uploads_keys_before_its_first_query(gateway, tmp_path):
    client = client_of(gateway, tmp_path / "keys")
    client.predict(np.array([1.0, 2.0, 3.0, 4.0]))
    key_id = client.crypto.key_id()
    assert client.key_actions == [f"generated key set {key_id[:12]}… and uploaded it"]
    assert gateway.refused == [] and gateway.keys == {key_id: 1}  # no query was refused first
    again = client_of(gateway, tmp_path / "keys")  # the next command: uploaded already
    again.predict(np.array([1.0, 2.0, 3.0, 4.0]))
    assert again.key_actions == [] and gateway.queries == 2


def test_a_new_model_version_is_named_when_new_keys_are_made(gateway, tmp_path):
    first = client_of(gateway, tmp_path / "keys")
    first.predict(np.array([1.0, 2.0, 3.0, 4.0]))
    gateway.version = 2  # the provider deployed a version with other client specs
    later = client_of(gateway, tmp_path / "keys")
    later.predict(np.array([1.0, 2.0, 3.0, 4.0]))
    key_id = later.crypto.key_id()
    assert later.key_actions == [
        f"model 'digits' moved from version 1 to version 2 (other client specs): generated new keys (key set {key_id[:12]}…) "
        "and uploaded them"
    ]
    assert gateway.keys[key_id] == 2 and gateway.refused == []


def test_keys_outdated_mid_session_names_both_versions(gateway, tmp_path):
    client = client_of(gateway, tmp_path / "keys")
    client.predict(np.array([1.0, 2.0, 3.0, 4.0]))
    gateway.version = 3  # moved while this client held version 1's specs
    client.predict(np.array([1.0, 2.0, 3.0, 4.0]))
    assert gateway.refused == ["keys_outdated"]
    assert client.key_actions[-1].startswith("model 'digits' moved from version 1 to version 3 (other client specs)")


def test_a_key_set_gone_from_the_platform_is_uploaded_again_and_said(gateway, tmp_path):
    client = client_of(gateway, tmp_path / "keys")
    client.predict(np.array([1.0, 2.0, 3.0, 4.0]))
    gateway.keys.clear()  # deleted (`query keys delete`) or swept
    client.predict(np.array([1.0, 2.0, 3.0, 4.0]))
    key_id = client.crypto.key_id()
    assert (
        client.key_actions[-1] == f"key set {key_id[:12]}… was no longer on the platform: uploaded it again and retried the query"
    )


def test_the_cli_says_what_it_did_with_the_keys(gateway, cli_client, tmp_path):
    (tmp_path / "x.csv").write_text("1,2,3,4\n")
    assert run("predict", "--input", str(tmp_path / "x.csv")).exit_code == 0
    gateway.version = 2
    result = run("predict", "--input", str(tmp_path / "x.csv"))
    assert result.exit_code == 0, result.output
    assert "cipherpool: model 'digits' moved from version 1 to version 2" in result.stderr
    assert "generated new keys" in result.stderr and "uploaded them" in result.stderr


# ---- the CLI's words ----------------------------------------------------------------------


def test_the_cli_names_its_flags_and_commands_not_python(tmp_path):
    no_token = CliRunner().invoke(cli, ["--url", "http://127.0.0.1:1", "query", "keygen"])
    assert no_token.exit_code == 2 and "pass --token" in no_token.stderr and "token=" not in no_token.stderr
    no_key = CliRunner().invoke(cli, ["--url", "http://127.0.0.1:1", "--data-dir", str(tmp_path), "model", "list"])
    assert "pass --api-key" in no_key.stderr and "api_key=" not in no_key.stderr
    no_url = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "--api-key", "cpk_x", "model", "list"])
    assert "pass --url" in no_url.stderr and "url=" not in no_url.stderr


def _library_messages() -> list[str]:
    """Messages the library and gateway raise that name Python calls or arguments."""
    from cipherpool.errors import CipherpoolError
    from cipherpool.services import queries
    from cipherpool.statuses import ModelStatus

    model = queries.ModelGrant("m1", "digits", ModelStatus.ACTIVE, 2, "specs", dedicated=False)
    several = queries.TokenGrant("t", "a", None, (model, queries.ModelGrant("m2", "health", ModelStatus.ACTIVE, 1, "s")))
    messages = [
        "No access token: pass token= or set CIPHERPOOL_TOKEN.",  # QueryClient, as GatewayClient is told
        "No API key: pass api_key= or set CIPHERPOOL_API_KEY.",
        "No gateway URL: pass url=, set CIPHERPOOL_URL, or run `cipherpool up` on this machine (it writes x).",
        "Input of shape (3,) does not fit this model: boom. encrypt() takes one sample: a 1-D array of the model's "
        "features, or one image without the batch axis.",  # cipherpool.fhe.client, which needs concrete to raise
    ]
    calls = [
        lambda: queries.check_key(None, model),
        lambda: queries.check_key(queries.KeyRef("b", "m1", "old specs", 1), model),
        lambda: queries.check_key(queries.KeyRef("b", "m1", "specs", 2, expired=True), model),
        lambda: queries.check_key_id("nope"),
        lambda: queries.pick_model(several, None),
        lambda: queries.route(model),
        lambda: queries.check_query(queries.TokenGrant("t", "a", None, (model,)), "m1"),
        lambda: EncryptedInput.decode(b"junk"),
    ]
    for call in calls:
        with pytest.raises(CipherpoolError) as raised:
            call()
        messages.append(raised.value.message)
    return messages


def test_library_messages_reach_the_cli_in_its_words():
    messages = _library_messages()
    assert all(python_words(m) for m in messages), [m for m in messages if not python_words(m)]
    for message in messages:
        assert python_words(for_cli(message)) == [], for_cli(message)
        assert "QueryClient" not in for_cli(message)
    regenerate = for_cli(messages[5])
    assert "made for version 1; model 'digits' serves version 2" in regenerate
    assert "`cipherpool query keys ensure`" in regenerate and "predict` does all of it by itself" in regenerate
    assert "`cipherpool query --wait-for-worker …`" in for_cli(messages[9])
    assert "(`cipherpool query --model NAME …`)" in for_cli(messages[8])


def test_api_fields_become_flags_but_flags_and_code_stay():
    assert for_cli("Give at most one of ttl_s, expires_at and no_expiry.") == (
        "Give at most one of --expires-in, --expires-at and --no-expiry."
    )
    assert for_cli("at most 2 worker(s) (max_workers): raise it (`cipherpool model update m --max-workers N`)") == (
        "at most 2 worker(s) (--max-workers): raise it (`cipherpool model update m --max-workers N`)"
    )
    assert for_cli("The reservation ends at x, which is past: give an ends_at in the future.").endswith(
        "give a --to in the future."
    )


def test_names_that_look_like_fields_are_left_alone():
    message = "Model 'max_workers' has no worker; see /srv/ends_at/log and `--ttl_s`."
    assert for_cli(message) == message


def test_step_by_step_after_a_new_version_the_upload_names_both_versions(gateway, cli_client, tmp_path):
    (tmp_path / "x.csv").write_text("1,2,3,4\n")
    assert run("predict", "--input", str(tmp_path / "x.csv")).exit_code == 0  # keys for version 1
    gateway.version = 2
    encrypted = run("encrypt", "--input", str(tmp_path / "x.csv"), "--output", str(tmp_path / "x.ct"))
    assert encrypted.exit_code == 0, encrypted.output
    assert (tmp_path / "x.ct").stat().st_mode & 0o777 == 0o600
    executed = run("execute", "--input", str(tmp_path / "x.ct"), "--output", str(tmp_path / "y.ct"))
    assert executed.exit_code == 0, executed.output
    assert "cipherpool: model 'digits' moved from version 1 to version 2" in executed.stderr
    decrypted = run("decrypt", "--input", str(tmp_path / "y.ct"), "--output", str(tmp_path / "y.json"), "--json")
    assert decrypted.exit_code == 0 and json.loads((tmp_path / "y.json").read_text())["argmax"] == [0]  # 1+2+3+4, mod 10


def test_encrypt_takes_one_sample(gateway, cli_client, tmp_path):
    (tmp_path / "x.csv").write_text("1,2,3,4\n5,6,7,8\n")
    result = run("encrypt", "--input", str(tmp_path / "x.csv"))
    assert (
        result.exit_code == InvalidInput.exit_code and "has 2 rows; `cipherpool query encrypt` takes one sample" in result.stderr
    )


def test_predict_on_many_rows_sends_batches_sized_by_the_first_ones_compute(gateway, tmp_path):
    client = client_of(gateway, tmp_path / "k")
    x = np.arange(40.0).reshape(10, 4)
    assert client.predict(x).shape == (10, 10) and gateway.batches == [4, 6]  # a fast model: all the rest at once
    gateway.batches.clear()
    gateway.compute_per_item_s = client.settings.batch_target_s / 2  # a slow one: 2 rows per batch
    scores = client.predict(x)
    assert gateway.batches == [4, 2, 2, 2]
    assert [int(np.argmax(row)) for row in scores] == [int(row.sum()) % 10 for row in x], "in order"
