"""`cipherpool alert`: thresholds on a model's query figures, and what they fired.

``alert set MODEL METRIC THRESHOLD`` creates the model's rule for the metric or replaces its
threshold; a rule with ``--webhook`` is called (signed, retried) when it fires and clears.
Metrics: average_query_s, current_query_s, queue_wait_s (seconds), error_rate (0 to 1),
queue_depth (queries waiting).
"""

from __future__ import annotations

import click

from cipherpool.cli.context import CliContext, pass_ctx
from cipherpool.cli.durations import DURATION
from cipherpool.client.management import UNSET
from cipherpool.statuses import AlertMetric

ALERT_COLUMNS = ["id", "model", "metric", "threshold", "window_s", "state", "value", "webhook_url", "evaluated_at"]
EVENT_COLUMNS = ["id", "at", "model", "metric", "kind", "value", "threshold", "delivery", "attempts", "last_error"]


@click.group()
def alert() -> None:
    """Performance alerts: thresholds on query time, queue wait, error rate, queue depth."""


@alert.command("set")
@click.argument("model")
@click.argument("metric", type=click.Choice([m.value for m in AlertMetric]))
@click.argument("threshold", type=float)
@click.option("--window", "window_s", type=DURATION, help="Measure over this long: 5m, 1h (1 min to 1 day; default 5m).")
@click.option("--webhook", help="Call this http(s) URL, signed, when the alert fires and clears.")
@click.option("--no-webhook", is_flag=True, help="Remove the rule's webhook.")
@click.option("--new-secret", is_flag=True, help="Make a new signing secret for the webhook (the old one stops).")
@pass_ctx
def set_(
    ctx: CliContext,
    model: str,
    metric: str,
    threshold: float,
    window_s: float | None,
    webhook: str | None,
    no_webhook: bool,
    new_secret: bool,
) -> None:
    """Alert when MODEL's METRIC goes above THRESHOLD. Setting a metric again replaces the
    rule's threshold (and window and webhook, if given). A new webhook's secret is printed
    once: keep it to verify the calls' X-Cipherpool-Signature."""
    if webhook is not None and no_webhook:
        raise click.UsageError("Give --webhook or --no-webhook, not both.")
    if window_s is not None and not float(window_s).is_integer():
        raise click.UsageError(f"--window is a whole number of seconds, not {window_s}.")
    url: str | None = None if no_webhook else webhook if webhook is not None else UNSET
    done = ctx.management().set_alert(
        model, metric, threshold, window_s=None if window_s is None else int(window_s), webhook_url=url, new_secret=new_secret
    )
    shown = done.model_dump(mode="json")
    if done.webhook_secret is not None:
        shown["note"] = "the webhook secret is shown once; store it now"
    ctx.emit(shown)


@alert.command("list")
@click.option("--model", "model_name", help="Only this model's rules.")
@pass_ctx
def list_(ctx: CliContext, model_name: str | None) -> None:
    """Alert rules: threshold, window, state (ok or firing) and the last figure."""
    ctx.emit(ctx.management().list_alerts(model_name), ALERT_COLUMNS)


@alert.command("remove")
@click.argument("alert_id")
@pass_ctx
def remove(ctx: CliContext, alert_id: str) -> None:
    """Delete a rule (its events stay in `alert events`)."""
    ctx.management().remove_alert(alert_id)
    ctx.emit({"removed": alert_id})


@alert.command("events")
@click.option("--model", "model_name", help="Only this model's events.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True, help="The latest this many.")
@pass_ctx
def events(ctx: CliContext, model_name: str | None, limit: int) -> None:
    """Alerts fired and cleared, oldest first, with how each webhook call went."""
    ctx.emit(ctx.management().alert_events(model_name, limit=limit), EVENT_COLUMNS)
