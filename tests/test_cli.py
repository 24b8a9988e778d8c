"""The CLI's shape and its local commands, through click's CliRunner."""

import click
import pytest
from click.testing import CliRunner

from cipherpool.cli import cli

NOUNS = {"up", "demo", "db", "admin", "gateway", "account", "model", "worker", "token", "query", "schedule", "alert"}
VERBS = {
    "account": {"show", "update", "rotate-key"},
    "model": {
        "deploy",
        "list",
        "show",
        "update",
        "version",
        "rollback",
        "delete",
        "events",
        "activate",
        "deactivate",
        "autoscale",
    },
    "worker": {"start", "stop", "list", "stats"},
    "token": {"create", "list", "show", "update", "assign", "unassign", "revoke", "delete"},
    "query": {"keygen", "upload-keys", "encrypt", "execute", "decrypt", "predict", "keys"},
    "db": {"init", "upgrade", "current"},
    "gateway": {"serve"},
    "schedule": {"add", "reserve", "list", "show", "pause", "resume", "remove"},
    "alert": {"set", "list", "remove", "events"},
}


def subcommands(group: click.Group) -> dict[str, click.Command]:
    """A group's commands, the root's imported on the way (they load by name: cipherpool.cli.COMMANDS)."""
    ctx = click.Context(group)
    return {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}


def test_the_group_has_the_nouns_and_verbs():
    nouns = subcommands(cli)
    assert set(nouns) >= NOUNS
    for noun, verbs in VERBS.items():
        assert verbs <= set(nouns[noun].commands), noun


def test_every_command_takes_json_after_its_name_too():
    def leaves(command):
        if not isinstance(command, click.Group):
            return [command]
        return [leaf for sub in subcommands(command).values() for leaf in leaves(sub)]

    found = leaves(cli)
    assert len(found) >= 76  # every noun's commands, loaded (76 when the nouns were imported eagerly)
    for leaf in found:
        assert sum("--json" in getattr(p, "opts", []) for p in leaf.params) == 1, leaf.name


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["model"],
        ["worker", "start"],
        ["query", "encrypt"],
        ["up"],
        ["demo"],
        ["model", "version", "add"],
        ["token", "update"],
        ["admin", "account", "disable"],
        ["schedule", "add"],
        ["schedule", "reserve"],
    ],
)
def test_help_works_everywhere(args):
    result = CliRunner().invoke(cli, args + ["--help"])
    assert result.exit_code == 0, result.output


def test_db_init_and_account_creation_print_a_key_once(tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["--data-dir", str(tmp_path), "db", "init"]).exit_code == 0
    result = runner.invoke(cli, ["--data-dir", str(tmp_path), "--json", "admin", "account", "create", "acme"])
    assert result.exit_code == 0, result.output
    assert '"api_key": "cpk_' in result.output
    again = runner.invoke(cli, ["--data-dir", str(tmp_path), "admin", "account", "create", "acme"])
    assert again.exit_code == 5 and "exists already" in again.output
    listed = runner.invoke(cli, ["--data-dir", str(tmp_path), "admin", "account", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert '"name": "acme"' in listed.output and "cpk_" not in listed.output.replace('"api_key_prefix": "cpk_', "")


def test_a_management_command_without_a_gateway_fails_clearly(tmp_path):
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "--api-key", "cpk_x", "model", "list"])
    assert result.exit_code == 2
    assert "CIPHERPOOL_URL" in result.output and "cipherpool up" in result.output


def test_the_url_comes_from_the_stack_file_that_up_writes(tmp_path):
    (tmp_path / "stack.json").write_text('{"url": "http://127.0.0.1:1"}')
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "--api-key", "cpk_x", "model", "list"])
    assert result.exit_code == 7 and "gateway_unavailable" in result.output and "127.0.0.1:1" in result.output


def test_a_request_the_client_refuses_to_send_is_invalid_input():
    """Bodies are checked as the gateway would before anything is sent: no gateway needed."""
    result = CliRunner().invoke(
        cli, ["--url", "http://127.0.0.1:1", "--api-key", "cpk_x", "account", "update", "--email", "not-an-email"]
    )
    assert result.exit_code == 6 and "error [invalid_input]" in result.output and "contact_email" in result.output


def test_a_missing_token_fails_clearly(tmp_path):
    result = CliRunner().invoke(cli, ["--url", "http://127.0.0.1:1", "query", "keygen"])
    assert result.exit_code == 2 and "CIPHERPOOL_TOKEN" in result.output


def test_python_dash_m_is_the_same_program():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "cipherpool", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Serve encrypted" in out.stdout


def test_clients_import_no_database_or_worker_code():
    """A client holds a gateway URL and a credential: no broker, no database, no server code."""
    import subprocess
    import sys

    code = (
        "import sys, cipherpool; from cipherpool import ManagementClient, QueryClient; "
        "print(sorted(m for m in ('sqlmodel', 'sqlalchemy', 'cipherpool.db', 'cipherpool.tasks', "
        "'cipherpool.workers', 'cipherpool.gateway', 'cipherpool.store', 'celery', 'kombu', 'redis', "
        "'fastapi', 'uvicorn', 'concrete', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_admin_commands_refuse_a_data_dir_without_a_database(tmp_path):
    """A mistyped --data-dir used to make an empty database of its own and an account in it."""
    runner = CliRunner()
    empty = tmp_path / "typo"
    for args in (
        ["admin", "account", "create", "acme"],
        ["admin", "account", "list"],
        ["admin", "credits", "history", "acme"],
        ["pool", "nodes", "--all"],
    ):
        result = runner.invoke(cli, ["--data-dir", str(empty), *args])
        assert result.exit_code == 2, (args, result.output)
        assert f"No cipherpool database at sqlite:///{empty / 'cipherpool.db'}" in result.output, result.output
        assert "--create-database" in result.output
    assert not (empty / "cipherpool.db").exists()  # asking created nothing


def test_admin_account_create_makes_the_database_when_told_and_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CIPHERPOOL_DATABASE_URL", f"sqlite:///{tmp_path / 'ops.db'}")
    from cipherpool.config.settings import reset_settings

    reset_settings()
    try:
        result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "admin", "account", "create", "acme", "--create-database"])
        assert result.exit_code == 0, result.output
        assert f"database: sqlite:///{tmp_path / 'ops.db'}" in result.output
        assert (tmp_path / "ops.db").stat().st_mode & 0o777 == 0o600
        again = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "admin", "account", "list"])
        assert again.exit_code == 0 and "acme" in again.output
    finally:
        reset_settings()


def test_the_database_url_is_printed_without_its_password():
    from cipherpool.cli.context import CliContext
    from cipherpool.config.settings import Settings

    ctx = CliContext(Settings(database_url="postgresql://ops:s3cret@db.example/cipherpool"))
    assert ctx.database == "postgresql://ops:***@db.example/cipherpool"
