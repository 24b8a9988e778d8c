"""Provider endpoints for a model's autoscaling policy (bearer API key): show, turn on or
change (PUT), turn off (DELETE). Another account's model is not found, as everywhere."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from cipherpool.api.schemas import NAME_PATTERN, AutoscaleIn, AutoscaleOut
from cipherpool.gateway.deps import Account, Gateway
from cipherpool.services import accounts
from cipherpool.services import autoscale as policies

router = APIRouter(prefix="/v1", tags=["provider"])
ModelName = Annotated[str, Path(pattern=NAME_PATTERN)]


@router.get("/models/{name}/autoscale", response_model=AutoscaleOut)
def show_autoscale(name: ModelName, gw: Gateway, acct: Account) -> AutoscaleOut:
    """The model's policy (``enabled`` false: off), its bounds and workers, and the
    autoscaler's latest decision with its reason."""
    with gw.ctx.session() as session:
        model, policy = policies.get_policy(session, accounts.get_account(session, acct.account_id), name)
        return policies.describe(session, model, policy)


@router.put("/models/{name}/autoscale", response_model=AutoscaleOut)
def set_autoscale(name: ModelName, body: AutoscaleIn, gw: Gateway, acct: Account) -> AutoscaleOut:
    """Turn autoscaling on or change it, between the model's min and max workers. Fields left
    out keep their value (a new policy: the defaults); ``null`` clears a target. Refused
    (422) without a target, or with a cool-down shorter than beat's autoscaling interval."""
    changes = body.model_dump(include=body.model_fields_set)
    with gw.ctx.session() as session:
        account = accounts.get_account(session, acct.account_id)
        model, policy = policies.set_policy(session, account, name, changes, gw.settings.autoscale_interval_s)
        return policies.describe(session, model, policy)


@router.delete("/models/{name}/autoscale", response_model=AutoscaleOut)
def disable_autoscale(name: ModelName, gw: Gateway, acct: Account) -> AutoscaleOut:
    """Turn autoscaling off; the model's workers stay as they are, the policy is kept."""
    with gw.ctx.session() as session:
        model, policy = policies.disable_policy(session, accounts.get_account(session, acct.account_id), name)
        return policies.describe(session, model, policy)
