"""`cipherpool query`: the end user's steps, files in and files out.

    cipherpool query keygen
    cipherpool query upload-keys
    cipherpool query encrypt  --input x.csv  --output x.ct
    cipherpool query execute  --input x.ct   --output y.ct
    cipherpool query decrypt  --input y.ct   [--output y.npy]
    cipherpool query predict  --input x.csv  (all of it at once, keys generated and uploaded as needed)
    cipherpool query keys list | ensure | delete [KEY_ID]

A query whose key set the platform no longer holds (expired, or deleted) uploads it again and
is retried once; after the model moved to a version with other client specs, new keys are
generated and uploaded. The command says what it did on stderr. Input files and --output
formats: :mod:`cipherpool.cli.arrays`. Errors name this CLI's flags and commands
(:mod:`cipherpool.cli.wording`).

Nothing heavy is imported for ``--help``; the client when a command runs, and concrete (torch
with it, seconds) only by the commands that make, load or use keys: ``keygen``,
``upload-keys``, ``encrypt``, ``decrypt``, ``predict``, ``keys ensure`` (:mod:`cipherpool.fhe.client`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cipherpool.cli.arrays import OUTPUT_FORMATS, check_output, read_rows, write_private_bytes, write_result
from cipherpool.cli.context import CliContext
from cipherpool.errors import InvalidInput

if TYPE_CHECKING:  # the client (numpy, httpx, the wire types) is imported when a command runs, not for --help
    from numpy.typing import NDArray

    from cipherpool.client.query import QueryClient

IN = click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
OUT = click.option("--output", "output_path", type=click.Path(dir_okay=False, path_type=Path), help="Where to write it (0600).")
RESULT_OUT = click.option(
    "--output",
    "output_path",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=check_output,
    help=f"Also write the result here (0600), as its extension says: {', '.join(OUTPUT_FORMATS)}.",
)


@click.group()
@click.option("--token", envvar="CIPHERPOOL_TOKEN", help="Access token (or CIPHERPOOL_TOKEN).")
@click.option(
    "--keys",
    "key_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of this client's keys (default: under the data directory).",
)
@click.option("--model", "model_name", help="The model to query, when the token is assigned to several.")
@click.option("--wait-for-worker", is_flag=True, help="Queue queries until a worker of the model is up (else refused at once).")
@click.pass_context
def query(ctx: click.Context, token: str | None, key_dir: Path | None, model_name: str | None, wait_for_worker: bool) -> None:
    """Encrypted queries, step by step, as an end user runs them."""
    cli_ctx: CliContext = ctx.obj
    if token:
        cli_ctx.settings = cli_ctx.settings.model_copy(update={"token": token})
    ctx.meta["key_dir"] = key_dir
    ctx.meta["model"] = model_name
    ctx.meta["wait_for_worker"] = wait_for_worker


def _client(ctx: click.Context) -> QueryClient:
    cli_ctx: CliContext = ctx.obj
    client = cli_ctx.query(ctx.meta.get("key_dir"), ctx.meta.get("model"))
    if ctx.meta.get("wait_for_worker"):
        client.wait_for_worker = True
    return client


def _samples(client: QueryClient, input_path: Path) -> NDArray[Any]:
    """The input file's samples, checked against the model's input shape before concrete is
    loaded (the gateway's description of the model says it); what was done to read it on stderr."""
    rows = read_rows(input_path)  # an empty or ragged file, NaN: refused before any request
    for note in rows.notes:
        click.echo(f"cipherpool: {note}", err=True)
    model = client.model
    return rows.for_model(model.name, model.version, model.input_shape)


def _say_what_it_did(client: QueryClient) -> None:
    """What the client did with its keys by itself (on stderr: stdout stays the answer)."""
    for action in client.key_actions:
        click.echo(f"cipherpool: {action}", err=True)


def _array_out(result: NDArray[Any], output_path: Path | None, ctx: CliContext) -> None:
    value = {"result": result.tolist()}
    if result.ndim == 2 and result.shape[1] > 1:
        value["argmax"] = result.argmax(axis=1).tolist()
    if output_path:
        write_result(output_path, value, result)
    ctx.emit(value)


@query.command("keygen")
@click.option("--force", is_flag=True, help="Replace existing keys.")
@click.pass_context
def keygen(ctx: click.Context, force: bool) -> None:
    """Generate this client's keys (the secret key stays in the key directory)."""
    client = _client(ctx)
    key_id = client.generate_keys(force=force)
    _say_what_it_did(client)
    ctx.obj.emit({"key_id": key_id, "key_dir": str(client.crypto.key_dir)})


@query.command("upload-keys")
@click.pass_context
def upload_keys(ctx: click.Context) -> None:
    """Upload the evaluation key (once; queries refer to it by id)."""
    client = _client(ctx)
    key_id = client.upload_evaluation_keys()
    _say_what_it_did(client)
    ctx.obj.emit({"key_id": key_id})


@query.command("encrypt")
@IN
@OUT
@click.pass_context
def encrypt(ctx: click.Context, input_path: Path, output_path: Path | None) -> None:
    """Encrypt one sample (.npy, or one row of numbers: CSV or white space) into a ciphertext file."""
    client = _client(ctx)
    sample = _samples(client, input_path)
    shape = client.model.input_shape
    if input_path.suffix != ".npy" and shape and sample.ndim > len(shape) - 1:
        raise InvalidInput(
            f"{input_path} has {len(sample)} rows; `cipherpool query encrypt` takes one sample "
            "(`cipherpool query predict` runs them all)."
        )
    ciphertext = client.encrypt(sample)
    _say_what_it_did(client)
    target = output_path or input_path.with_suffix(".ct")
    write_private_bytes(target, ciphertext)
    ctx.obj.emit({"ciphertext": str(target), "bytes": len(ciphertext)})


@query.command("execute")
@IN
@OUT
@click.option("--timeout", type=float, help="Seconds to wait for the result.")
@click.pass_context
def execute(ctx: click.Context, input_path: Path, output_path: Path | None, timeout: float | None) -> None:
    """Run the model on a ciphertext file; writes the encrypted result."""
    client = _client(ctx)
    try:
        output = client.execute(input_path.read_bytes(), timeout=timeout)
    finally:
        _say_what_it_did(client)
    target = output_path or input_path.with_suffix(".out")
    write_private_bytes(target, output)
    ctx.obj.emit({"result": str(target), "bytes": len(output), **client.last_timings})


@query.command("decrypt")
@IN
@RESULT_OUT
@click.pass_context
def decrypt(ctx: click.Context, input_path: Path, output_path: Path | None) -> None:
    """Decrypt a result file with this client's secret key."""
    _array_out(_client(ctx).decrypt(input_path.read_bytes()), output_path, ctx.obj)


@query.command("predict")
@IN
@RESULT_OUT
@click.option("--timeout", type=float, help="Seconds to wait for each result.")
@click.pass_context
def predict(ctx: click.Context, input_path: Path, output_path: Path | None, timeout: float | None) -> None:
    """Encrypt, execute and decrypt in one step (rows of a 2-D input go in batches); keys
    are generated and uploaded as needed. Input: .npy, or CSV (a header row is skipped)."""
    client = _client(ctx)
    x = _samples(client, input_path)
    try:
        result = client.predict(x, timeout=timeout)
    finally:
        _say_what_it_did(client)
    _array_out(result, output_path, ctx.obj)


@query.group("keys")
def keys() -> None:
    """This token's key sets on the platform: list, ensure, delete."""


@keys.command("list")
@click.pass_context
def keys_list(ctx: click.Context) -> None:
    """Key sets of this token: model, version made for, status, size, last use, expiry."""
    found = _client(ctx).list_keys()
    ctx.obj.emit(
        found, ["key_id", "model", "made_for_version", "serving_version", "status", "size_bytes", "last_used_at", "expires_at"]
    )


@keys.command("ensure")
@click.pass_context
def keys_ensure(ctx: click.Context) -> None:
    """Make sure the platform holds this client's keys for the serving version (generated and
    uploaded if needed)."""
    client = _client(ctx)
    outcome = client.ensure_keys()
    _say_what_it_did(client)
    ctx.obj.emit({"key_id": client.crypto.key_id(), "outcome": outcome})


@keys.command("delete")
@click.argument("key_id", required=False)
@click.pass_context
def keys_delete(ctx: click.Context, key_id: str | None) -> None:
    """Delete a key set from the platform (default: this client's); the keys stay in the key directory."""
    ctx.obj.emit({"deleted": _client(ctx).delete_keys(key_id)})
