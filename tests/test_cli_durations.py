"""The CLI's durations (--expires-in) and times (--expires-at, --since)."""

from datetime import UTC, datetime, timedelta

import click
import pytest
from click.testing import CliRunner

from cipherpool.cli.durations import DURATION, MOMENT, parse_duration, parse_moment


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30d", 30 * 86400),
        ("12h", 12 * 3600),
        ("90m", 5400),
        ("3600s", 3600),
        ("2w", 14 * 86400),
        ("1h30m", 5400),
        ("1.5h", 5400),
        (" 45S ", 45),
        ("0.5s", 0.5),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "30x", "30 d", "h12", "1h-30m", "-5", "0", "0s", "inf", "nan", "30d junk"])
def test_what_is_not_a_duration(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_times_are_utc_unless_they_have_an_offset():
    assert parse_moment("2030-01-31") == datetime(2030, 1, 31, tzinfo=UTC)
    assert parse_moment("2030-01-31T12:00:00Z") == datetime(2030, 1, 31, 12, tzinfo=UTC)
    east = parse_moment("2030-01-31T12:00:00+02:00")
    assert east.utcoffset() == timedelta(hours=2) and east == datetime(2030, 1, 31, 10, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_moment("next tuesday")


def test_the_click_types_say_what_is_wrong():
    @click.command()
    @click.option("--expires-in", type=DURATION)
    @click.option("--expires-at", type=MOMENT)
    def show(expires_in, expires_at):
        click.echo(f"{expires_in} {expires_at.isoformat() if expires_at else None}")

    ok = CliRunner().invoke(show, ["--expires-in", "90m", "--expires-at", "2030-01-31"])
    assert ok.exit_code == 0 and ok.output.strip() == "5400.0 2030-01-31T00:00:00+00:00"
    bad = CliRunner().invoke(show, ["--expires-in", "soon"])
    assert bad.exit_code == 2 and "is not a duration" in bad.output


@pytest.mark.parametrize("text", ["30", "3600", "0.5", " 7 ", "1e3"])
def test_a_number_without_a_unit_is_refused(text):
    """`--expires-in 30` used to mean 30 seconds, silently: now it names the units."""
    with pytest.raises(ValueError, match="has no unit"):
        parse_duration(text)


def test_the_cli_refuses_a_duration_without_a_unit_and_names_the_units():
    from cipherpool.cli import cli

    result = CliRunner().invoke(
        cli, ["--url", "http://127.0.0.1:1", "--api-key", "cpk_x", "token", "create", "t", "--expires-in", "30"]
    )
    assert result.exit_code == 2, result.output
    assert "'30' has no unit" in result.output
    assert all(unit in result.output for unit in ("30s", "10m", "2h", "7d"))
