"""Route dependencies: the gateway's state and the principal the guard authenticated.

They are ``async def`` although they await nothing: FastAPI runs a plain ``def`` dependency in
its thread pool, a thread hop each (measured about 0.1 ms of gateway CPU apiece, two on every
query), for what is an attribute read."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from cipherpool.gateway.auth import AccountPrincipal, require_account, require_grant
from cipherpool.gateway.state import GatewayState
from cipherpool.services.queries import TokenGrant

OCTET_STREAM = "application/octet-stream"
BINARY_BODY = {"requestBody": {"required": True, "content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}}}}
BINARY_RESPONSE = {"content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}}}


async def gateway(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gw
    return state


async def account(request: Request) -> AccountPrincipal:
    return require_account(getattr(request.state, "principal", None))


async def grant(request: Request) -> TokenGrant:
    return caller(request)[1]


def caller(request: Request) -> tuple[GatewayState, TokenGrant]:
    """The gateway's state and the end user's grant, read directly by the routes every query
    takes (submit, poll): as two FastAPI dependencies they were about 4 % of the query route's
    CPU (benchmarks/gateway_cost.py), for two attribute reads."""
    state: GatewayState = request.app.state.gw
    return state, require_grant(getattr(request.state, "principal", None))


Gateway = Annotated[GatewayState, Depends(gateway)]
Account = Annotated[AccountPrincipal, Depends(account)]
Grant = Annotated[TokenGrant, Depends(grant)]
