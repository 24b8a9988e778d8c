"""The node hook that counts each computed query for usage reports
(:mod:`cipherpool.billing.querycounts` keeps the layout and reads them)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from redis import Redis

from cipherpool.billing.querycounts import count, counting
from cipherpool.workers.afteranswer import AfterAnswer
from cipherpool.workers.hooks import Hook, QueryEvent


class QueryCounter(Hook):
    """Counts at once, or, given ``after``, once the query's answer is stored (a pool node:
    :mod:`cipherpool.workers.afteranswer`)."""

    def __init__(self, redis: Callable[[], Redis], after: AfterAnswer | None = None):
        self._redis = redis
        self._after = after

    def query_computed(self, query: QueryEvent) -> None:
        if not query.account_id or not query.model_id:
            return
        day = datetime.fromtimestamp(time.time(), UTC).date()
        if self._after is not None:
            self._after.add(counting(query.account_id, query.model_id, query.worker_id, day))
        else:
            count(self._redis(), query.account_id, query.model_id, query.worker_id, day)
