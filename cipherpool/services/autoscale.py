"""A model's autoscaling policy, as its provider sets, reads and turns it off.

Scoped like every provider service: the model is looked up in the caller's account, so
another account's model is ``ModelNotFound`` (the same answer as a model that exists
nowhere). Turning it off keeps the row (the settings, and what the autoscaler did last) for
the next time it is turned on. Each change is a ``settings_changed`` event of the model. The
decisions themselves are :mod:`cipherpool.scheduler.autoscale`'s; the policy is deleted with
its model (:func:`cipherpool.services.models.delete_model`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session

from cipherpool.api.schemas import AutoscaleOut
from cipherpool.clock import utcnow
from cipherpool.db.tables import Account, AutoscalePolicy, Model
from cipherpool.errors import InvalidInput
from cipherpool.services import events
from cipherpool.services import workers as worker_service
from cipherpool.services.models import get_model
from cipherpool.statuses import EventKind

TARGETS = ("target_queue_wait_s", "target_queue_depth")  # null clears one (at least one must remain)
DELAYS = ("scale_up_after_s", "idle_after_s", "cooldown_up_s", "cooldown_down_s")  # null leaves one unchanged
FIELDS = TARGETS + DELAYS


def get_policy(session: Session, account: Account, model_name: str) -> tuple[Model, AutoscalePolicy | None]:
    """The account's model and its policy (None: never set)."""
    model = get_model(session, account, model_name)
    return model, session.get(AutoscalePolicy, model.id)


def check_policy(policy: AutoscalePolicy, interval_s: float) -> None:
    """InvalidInput unless the policy can work: a positive target at least, delays that are
    not negative, and cool-downs no shorter than beat's autoscaling interval (a shorter one
    could not be honoured: beat decides only once an interval)."""
    if policy.target_queue_wait_s is None and policy.target_queue_depth is None:
        raise InvalidInput(
            "Autoscaling needs a target: a queue wait (target_queue_wait_s, e.g. 5 s) or queries "
            "waiting per worker (target_queue_depth), or both."
        )
    if policy.target_queue_wait_s is not None and not policy.target_queue_wait_s > 0:
        raise InvalidInput(f"target_queue_wait_s must be more than 0 s, not {policy.target_queue_wait_s:g}.")
    if policy.target_queue_depth is not None and policy.target_queue_depth < 1:
        raise InvalidInput(f"target_queue_depth must be at least 1, not {policy.target_queue_depth}.")
    if policy.scale_up_after_s < 0 or not policy.idle_after_s > 0:
        raise InvalidInput("scale_up_after_s must be 0 s or more and idle_after_s more than 0 s.")
    for name in ("cooldown_up_s", "cooldown_down_s"):
        if getattr(policy, name) < interval_s:
            raise InvalidInput(
                f"{name} must be at least the autoscaling interval ({interval_s:g} s): beat decides "
                f"once an interval; not {getattr(policy, name):g} s."
            )


def set_policy(
    session: Session, account: Account, model_name: str, changes: dict[str, Any], interval_s: float
) -> tuple[Model, AutoscalePolicy]:
    """Turn the model's autoscaling on with ``changes`` applied (fields left out keep their
    value, a new policy's the defaults; ``None`` clears a target). Turning it on again starts
    a fresh episode: what was seen before it was off does not count."""
    unknown = set(changes) - set(FIELDS)
    if unknown:
        raise InvalidInput(f"Unknown autoscaling settings: {', '.join(sorted(unknown))}; settable: {', '.join(FIELDS)}.")
    model, policy = get_policy(session, account, model_name)
    policy = policy or AutoscalePolicy(model_id=model.id, account_id=account.id, enabled=False)
    settings = {name: getattr(policy, name) for name in FIELDS}
    settings.update({k: v for k, v in changes.items() if v is not None or k in TARGETS})
    check_policy(AutoscalePolicy(model_id=model.id, account_id=account.id, **settings), interval_s)  # refused: unchanged
    for name, value in settings.items():
        setattr(policy, name, value)
    if not policy.enabled:
        policy.enabled, policy.above_since, policy.idle_since = True, None, None
    policy.updated_at = utcnow()
    session.add(policy)
    events.record(session, model, EventKind.SETTINGS_CHANGED, f"autoscaling on: {summary(policy)}")
    return model, policy


def disable_policy(session: Session, account: Account, model_name: str) -> tuple[Model, AutoscalePolicy | None]:
    """Turn the model's autoscaling off (its workers stay as they are); nothing if it was off."""
    model, policy = get_policy(session, account, model_name)
    if policy is None or not policy.enabled:
        return model, policy
    policy.enabled, policy.above_since, policy.idle_since, policy.updated_at = False, None, None, utcnow()
    session.add(policy)
    events.record(session, model, EventKind.SETTINGS_CHANGED, "autoscaling off")
    return model, policy


def summary(policy: AutoscalePolicy) -> str:
    """The policy in one line, for its event."""
    targets = [
        f"queue wait > {policy.target_queue_wait_s:g} s" if policy.target_queue_wait_s is not None else "",
        f"> {policy.target_queue_depth} waiting per worker" if policy.target_queue_depth is not None else "",
    ]
    return (
        f"add a worker after {policy.scale_up_after_s:g} s of {' or '.join(t for t in targets if t)}, remove one "
        f"after {policy.idle_after_s:g} s idle; cool-downs {policy.cooldown_up_s:g} s up, "
        f"{policy.cooldown_down_s:g} s down"
    )


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def describe(session: Session, model: Model, policy: AutoscalePolicy | None) -> AutoscaleOut:
    """The policy as the API shows it; a model that never had one shows the defaults, off."""
    shown = policy or AutoscalePolicy(model_id=model.id, account_id=model.account_id, enabled=False)
    return AutoscaleOut(
        model=model.name,
        enabled=shown.enabled,
        target_queue_wait_s=shown.target_queue_wait_s,
        target_queue_depth=shown.target_queue_depth,
        scale_up_after_s=shown.scale_up_after_s,
        idle_after_s=shown.idle_after_s,
        cooldown_up_s=shown.cooldown_up_s,
        cooldown_down_s=shown.cooldown_down_s,
        min_workers=model.min_workers,
        max_workers=model.max_workers,
        workers=len(worker_service.serving(session, model_id=model.id)),
        above_since=_iso(shown.above_since),
        idle_since=_iso(shown.idle_since),
        last_scaled_at=_iso(shown.last_scaled_at),
        last_action=shown.last_action,
        last_reason=shown.last_reason,
        updated_at=_iso(shown.updated_at) if policy is not None else None,
    )
