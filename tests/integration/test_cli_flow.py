"""The end user's steps as files in and files out, and the provider's commands, via the CLI."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cipherpool.cli import cli

pytestmark = pytest.mark.integration


def run(platform, *args, token=None):
    base = [
        "--url",
        platform.stack.gateway_url,
        "--api-key",
        platform.api_key,
        "--data-dir",
        str(platform.settings.data_dir),
        "--json",
    ]
    if token:
        args = ("query", "--token", token) + args[1:] if args[0] == "query" else args
    result = CliRunner().invoke(cli, base + list(args))
    if result.exit_code != 0 and result.exc_info:
        import traceback

        traceback.print_exception(*result.exc_info)
    assert result.exit_code == 0, result.output
    return result.output


def test_query_step_by_step_with_files(platform, examples, tmp_path):
    keys = str(tmp_path / "keys")
    x = examples["digits"].x_test[4]
    np.savetxt(tmp_path / "x.csv", x.reshape(1, -1), delimiter=",")
    token = platform.tokens["digits"]
    run(platform, "query", "--keys", keys, "keygen", token=token)
    run(platform, "query", "--keys", keys, "upload-keys", token=token)
    x_csv, x_ct, y_ct = (str(tmp_path / name) for name in ("x.csv", "x.ct", "y.ct"))
    run(platform, "query", "--keys", keys, "encrypt", "--input", x_csv, "--output", x_ct, token=token)
    run(platform, "query", "--keys", keys, "execute", "--input", x_ct, "--output", y_ct, token=token)
    out = json.loads(
        run(
            platform,
            "query",
            "--keys",
            keys,
            "decrypt",
            "--input",
            str(tmp_path / "y.ct"),
            "--output",
            str(tmp_path / "y.npy"),
            token=token,
        )
    )
    clear = examples["digits"].clear(x.reshape(1, -1))
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), clear, atol=1e-3)
    assert out["argmax"] == [int(clear.argmax())]


def test_provider_commands(platform):
    models = json.loads(run(platform, "model", "list"))
    assert {m["name"] for m in models} >= {"digits", "cancer"}
    workers = json.loads(run(platform, "worker", "list", "--model", "digits"))
    assert any(w["status"] == "up" for w in workers)
    created = json.loads(run(platform, "token", "create", "cli-user", "--model", "digits"))
    assert created["token"].startswith("cpt_")
    listed = run(platform, "token", "list")
    assert "cli-user" in listed and created["token"] not in listed


def test_errors_exit_with_their_code(platform):
    result = CliRunner().invoke(
        cli, ["--url", platform.stack.gateway_url, "--api-key", platform.api_key, "model", "activate", "no-such-model"]
    )
    assert result.exit_code == 4 and "model_not_found" in result.output
