"""The node hook that counts each computed query for usage reports
(:mod:`cipherpool.billing.querycounts` keeps the layout and reads them)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from redis import Redis

from cipherpool.billing.querycounts import count
from cipherpool.workers.hooks import Hook, QueryEvent


class QueryCounter(Hook):
    def __init__(self, redis: Callable[[], Redis]):
        self._redis = redis

    def query_computed(self, query: QueryEvent) -> None:
        if not query.account_id or not query.model_id:
            return
        count(self._redis(), query.account_id, query.model_id, query.worker_id, datetime.fromtimestamp(time.time(), UTC).date())
