"""Telling every gateway that what it caches changed: two counters in Redis.

Gateways cache credentials and which models have a worker up, and compare two counters at
each request (one Redis round trip). A writer bumps the counter of what it changed: a
credential (:func:`credentials_changed`: a key rotated, a token revoked, an account
disabled), or a model's serving state (:func:`serving_changed`: a worker started, stopped,
on standby, resumed, a version rolled out). At the bottom floor because writers live in every
layer: the gateway, the operator's commands, pool nodes, beat's jobs.
"""

from __future__ import annotations

import logging

from cipherpool.context import PlatformContext
from cipherpool.names import AUTH_GENERATION_KEY, SERVING_GENERATION_KEY

log = logging.getLogger("cipherpool.announce")


def serving_changed(ctx: PlatformContext) -> None:
    """Which models have a worker up changed: gateways drop what they cached of it (a query for
    a model with no worker up is refused at submit) and keep their cached credentials."""
    _bump(ctx, SERVING_GENERATION_KEY, "a worker change")


def credentials_changed(ctx: PlatformContext) -> None:
    """A credential changed: gateways drop every cached credential now."""
    _bump(ctx, AUTH_GENERATION_KEY, "a credential change")


def _bump(ctx: PlatformContext, key: str, what: str) -> None:
    try:
        ctx.store.redis.incr(key)
    except Exception as exc:  # noqa: BLE001 - gateways catch up within their cache TTL anyway
        log.warning("could not announce %s to the gateways: %s", what, exc)
