"""The management plane through the CLI and the real gateway: the provider's account, model
settings, versions and events, token lifecycle, and the operator's `admin account` commands.
No workers are started: nothing here needs one."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from cipherpool.cli import cli
from cipherpool.client import management
from cipherpool.config.settings import reset_settings

pytestmark = pytest.mark.integration


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def invoke(env, *args, expect=0, input=None):
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env, input=input)
    if result.exit_code != expect and result.exc_info and result.exc_info[0] is not SystemExit:
        import traceback

        traceback.print_exception(*result.exc_info)
    assert result.exit_code == expect, result.output
    return result


def run(stack, api_key, *args, expect=0, input=None):
    """The provider's CLI: the gateway and the key from the environment, as a script sets them."""
    env = {"CIPHERPOOL_URL": stack.gateway_url, "CIPHERPOOL_API_KEY": api_key}
    return invoke(env, *args, expect=expect, input=input)


def data(stack, api_key, *args):
    return json.loads(run(stack, api_key, *args).stdout)


def admin(stack, *args, expect=0):
    """The operator's CLI, where the database is: the stack's data directory, database and broker."""
    env = {
        "CIPHERPOOL_DATA_DIR": str(stack.data_dir),
        "CIPHERPOOL_DATABASE_URL": stack.settings.effective_database_url(),
        "CIPHERPOOL_BROKER_URL": stack.broker_url,
    }
    reset_settings()  # the settings are read once per process: read them with this environment
    try:
        return invoke(env, *args, expect=expect)
    finally:
        reset_settings()


@pytest.fixture(scope="module")
def cancer_path(tmp_path_factory):
    """The small example (an 8-bit logistic regression: tiny keys, seconds to train)."""
    from cipherpool.examples import train_breast_cancer

    return train_breast_cancer(tmp_path_factory.mktemp("cli-management") / "cancer").path


@pytest.fixture(scope="module")
def provider(stack):
    return stack.create_account(unique("cli-provider"))


@pytest.fixture(scope="module")
def two_models(stack, provider, cancer_path):
    first, second = unique("cli-m1"), unique("cli-m2")
    detail = data(
        stack,
        provider,
        "--json",
        "model",
        "deploy",
        first,
        cancer_path,
        "--description",
        "breast cancer",
        "--min-workers",
        0,
        "--max-workers",
        2,
        "--shared",
    )
    assert (detail["description"], detail["max_workers"], detail["shared"]) == ("breast cancer", 2, True)
    text = run(stack, provider, "model", "deploy", second, cancer_path).stdout  # text mode: settings, then versions
    assert f"name: {second}" in text and "versions:" in text and "NUMBER" in text
    return first, second


def test_account_show_update_and_rotate_key(stack):
    name = unique("cli-acct")
    key = stack.create_account(name)
    shown = data(stack, key, "account", "show", "--json")
    assert shown["name"] == name and shown["status"] == "active" and key.startswith(shown["api_key_prefix"].rstrip("…"))
    updated = data(stack, key, "account", "update", "--organisation", "Acme Labs", "--email", "ops@acme.test", "--json")
    assert (updated["organisation"], updated["contact_email"]) == ("Acme Labs", "ops@acme.test")
    cleared = data(stack, key, "--json", "account", "update", "--organisation", "", "--name", name + "-b")
    assert (cleared["name"], cleared["organisation"], cleared["contact_email"]) == (name + "-b", None, "ops@acme.test")
    assert "Nothing to change" in run(stack, key, "account", "update", expect=2).output

    rotated = run(stack, key, "account", "rotate-key")
    assert "shown once" in rotated.stdout and "old key stopped working" in rotated.stdout
    refused = run(stack, key, "account", "show", expect=3)  # the old key, at once
    assert "error [invalid_api_key]" in refused.output
    new_key = next(line.split(": ", 1)[1] for line in rotated.stdout.splitlines() if line.startswith("api_key: "))
    assert data(stack, new_key, "account", "show", "--json")["name"] == name + "-b"


def test_model_settings_show_update_versions_and_delete(stack, provider, two_models, cancer_path):
    first, _ = two_models
    shown = data(stack, provider, "model", "show", first, "--json")
    assert [v["number"] for v in shown["versions"]] == [1] and shown["versions"][0]["serving"]
    assert shown["input_shape"] and shown["versions"][0]["input_shape"] == shown["input_shape"]
    assert shown["status"] == "deployed" and shown["running_workers"] == 0

    updated = data(
        stack,
        provider,
        "model",
        "update",
        first,
        "--description",
        "v1 of the classifier",
        "--max-workers",
        3,
        "--no-shared",
        "--json",
    )
    assert (updated["description"], updated["max_workers"], updated["shared"], updated["min_workers"]) == (
        "v1 of the classifier",
        3,
        False,
        0,
    )
    assert run(stack, provider, "model", "update", first, expect=2).exit_code == 2
    assert "--max-workers" in run(stack, provider, "model", "update", first, "--max-workers", 0, expect=2).output

    listed = data(stack, provider, "model", "list", "--json")
    assert {m["name"] for m in listed} >= set(two_models)
    assert first in run(stack, provider, "model", "list").stdout

    # a second version (no workers: it serves at once), then back to the first
    added = data(stack, provider, "model", "version", "add", first, cancer_path, "--note", "same weights", "--json")
    assert added["version"] == 2 and [v["note"] for v in added["versions"]] == ["", "same weights"]
    versions = data(stack, provider, "model", "version", "list", first, "--json")
    assert [(v["number"], v["serving"]) for v in versions] == [(1, False), (2, True)]
    back = data(stack, provider, "model", "rollback", first, "--to", 1, "--json")
    assert back["version"] == 1

    doomed = unique("cli-doomed")
    run(stack, provider, "model", "deploy", doomed, cancer_path, "--json")
    assert "Aborted" in run(stack, provider, "model", "delete", doomed, input="n\n", expect=1).output
    assert data(stack, provider, "model", "delete", doomed, "--yes", "--json") == {"deleted": doomed}
    assert "model_not_found" in run(stack, provider, "model", "show", doomed, expect=4).output


def test_model_events(stack, provider, two_models, monkeypatch):
    first, _ = two_models
    run(stack, provider, "model", "update", first, "--description", "for the event log")
    text = run(stack, provider, "model", "events", first).stdout
    lines = text.splitlines()
    assert "deployed" in lines[0] and any("settings_changed" in line for line in lines)

    found = data(stack, provider, "model", "events", first, "--json")
    kinds = [e["kind"] for e in found]
    assert kinds[0] == "deployed" and "settings_changed" in kinds
    assert [e["id"] for e in data(stack, provider, "model", "events", first, "--limit", 1, "--json")] == [found[0]["id"]]
    after_first = data(stack, provider, "model", "events", first, "--since", found[0]["id"], "--json")
    assert [e["id"] for e in after_first] == [e["id"] for e in found[1:]]
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert data(stack, provider, "model", "events", first, "--since", future, "--json") == []
    assert "not an ISO 8601 time" in run(stack, provider, "model", "events", first, "--since", "yesterday", expect=2).output

    # --follow prints what is there, then polls; the poll's sleep stands in for Ctrl-C
    def interrupt(_seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(management, "time", SimpleNamespace(sleep=interrupt))
    followed = run(stack, provider, "model", "events", first, "--follow", "--json").stdout
    assert [json.loads(line)["id"] for line in followed.splitlines()] == [e["id"] for e in found]
    followed_text = run(stack, provider, "model", "events", first, "--follow", "--since", found[0]["id"]).stdout
    assert len(followed_text.splitlines()) == len(found) - 1


def test_token_lifecycle(stack, provider, two_models):
    first, second = two_models
    name = unique("cli-tok")
    created = data(stack, provider, "token", "create", name, "--model", first, "--expires-in", "7d", "--quota", 5, "--json")
    value, token_id = created["token"], created["id"]
    assert value.startswith("cpt_") and created["models"] == [first] and created["quota"] == 5
    expires = datetime.fromisoformat(created["expires_at"])
    assert abs(expires - (datetime.now(UTC) + timedelta(days=7))) < timedelta(minutes=5)

    listed_raw = run(stack, provider, "token", "list", "--json").stdout
    assert value not in listed_raw
    (mine,) = [t for t in json.loads(listed_raw) if t["id"] == token_id]
    assert "token" not in mine and mine["masked"].startswith("cpt_") and mine["status"] == "active"
    table = run(stack, provider, "token", "list", "--model", first).stdout
    assert table.splitlines()[0].split()[:5] == ["ID", "NAME", "MODELS", "MASKED", "STATUS"] and name in table
    assert data(stack, provider, "token", "show", token_id, "--json")["name"] == name

    assert data(stack, provider, "token", "update", token_id, "--disable", "--json")["status"] == "disabled"
    assert data(stack, provider, "token", "update", token_id, "--enable", "--json")["status"] == "active"
    changed = data(stack, provider, "token", "update", token_id, "--no-quota", "--no-expiry", "--json")
    assert (changed["quota"], changed["expires_at"]) == (None, None)
    assert data(stack, provider, "token", "update", token_id, "--expires-at", "2099-01-01T00:00:00Z", "--json")[
        "expires_at"
    ].startswith("2099-01-01")
    assert "not both" in run(stack, provider, "token", "update", token_id, "--quota", 1, "--no-quota", expect=2).output
    assert (
        "at most one"
        in run(stack, provider, "token", "create", unique("cli-tok"), "--expires-in", "1d", "--no-expiry", expect=2).output
    )
    assert (
        "is not a duration" in run(stack, provider, "token", "create", unique("cli-tok"), "--expires-in", "soon", expect=2).output
    )

    assert sorted(data(stack, provider, "token", "assign", token_id, second, "--json")["models"]) == sorted([first, second])
    assert data(stack, provider, "token", "unassign", token_id, first, "--json")["models"] == [second]
    assert [t["id"] for t in data(stack, provider, "token", "list", "--model", second, "--json")] == [token_id]
    kinds = [e["kind"] for e in data(stack, provider, "model", "events", first, "--json")]
    assert "token_assigned" in kinds and "token_unassigned" in kinds

    revoked = data(stack, provider, "token", "revoke", token_id, "--json")
    assert revoked["revoked"] and revoked["status"] == "revoked"
    assert "revoked for good" in run(stack, provider, "token", "update", token_id, "--enable", expect=6).output
    assert "Aborted" in run(stack, provider, "token", "delete", token_id, input="n\n", expect=1).output
    run(stack, provider, "token", "delete", token_id, input="y\n")
    assert "token_not_found" in run(stack, provider, "token", "show", token_id, expect=4).output


def test_admin_accounts(stack):
    name = unique("cli-op")
    created = json.loads(
        admin(stack, "admin", "account", "create", name, "--organisation", "Op Co", "--email", "op@co.test", "--json").stdout
    )
    key = created["api_key"]
    assert key.startswith("cpk_") and created["organisation"] == "Op Co" and created["contact_email"] == "op@co.test"

    listed = json.loads(admin(stack, "--json", "admin", "account", "list").stdout)
    (row,) = [a for a in listed if a["name"] == name]
    assert "api_key" not in row and row["status"] == "active"
    assert name in admin(stack, "admin", "account", "list").stdout
    assert json.loads(admin(stack, "admin", "account", "show", row["id"], "--json").stdout)["name"] == name
    assert "account_not_found" in admin(stack, "admin", "account", "show", unique("nobody"), expect=4).output
    assert data(stack, key, "account", "show", "--json")["id"] == row["id"]

    disabled = json.loads(admin(stack, "admin", "account", "disable", name, "--json").stdout)
    assert disabled == {"account": {**disabled["account"], "status": "disabled"}, "workers_stopped": []}
    assert "error [account_disabled]" in run(stack, key, "account", "show", expect=3).output  # refused at once
    enabled = admin(stack, "admin", "account", "enable", name).stdout
    assert "status: active" in enabled
    assert data(stack, key, "account", "show", "--json")["status"] == "active"
    text = admin(stack, "admin", "account", "disable", row["id"]).stdout
    assert "status: disabled" in text and "workers_stopped: -" in text
