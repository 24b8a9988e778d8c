"""The gateway's lookup cache: refreshed ahead of expiry while in use, never past its TTL."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cipherpool.gateway.ttlcache import Refresher, TtlCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr("cipherpool.gateway.ttlcache.time.monotonic", c)
    return c


class Background(Refresher):
    """A refresher whose calls run when the test says, those due by the test's clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pending: list[tuple[float, Callable[[], None]]] = []
        self.closed = False

    def schedule(self, at: float, fn: Callable[[], None]) -> bool:
        if self.closed:
            return False
        self.pending.append((at, fn))
        return True

    def close(self) -> None:
        self.closed = True

    def run(self) -> None:
        due = [fn for at, fn in self.pending if at <= self.clock.now]
        self.pending = [(at, fn) for at, fn in self.pending if at > self.clock.now]
        for fn in due:
            fn()


def counting(values: list[str]) -> tuple[Callable[[], str], list[str]]:
    loads: list[str] = []

    def load() -> str:
        value = values[min(len(loads), len(values) - 1)]
        loads.append(value)
        return value

    return load, loads


def test_an_entry_in_use_is_loaded_again_shortly_before_it_expires(clock: Clock) -> None:
    background = Background(clock)
    cache: TtlCache[str] = TtlCache(2.0, background)
    load, loads = counting(["v1", "v2", "v3"])
    assert cache.get_or_load("k", load) == "v1"
    assert background.pending == []  # loaded, not read yet: nothing scheduled
    clock.now += 0.5
    assert cache.get_or_load("k", lambda: "never on the path") == "v1"  # answered from the entry
    assert cache.peek("k") == "v1"
    assert [round(at, 6) for at, _ in background.pending] == [1001.8]  # once, at 0.9 of its life
    background.run()
    assert loads == ["v1"]  # not before its time
    clock.now = 1001.8
    background.run()
    assert loads == ["v1", "v2"]
    clock.now = 1003.0  # 3 s after the first load, 1.2 s after the refresh began
    assert cache.peek("k") == "v2"  # a steady reader never meets an expired entry
    assert [round(at, 6) for at, _ in background.pending] == [1003.6]


def test_a_value_is_never_served_past_its_ttl_from_its_load(clock: Clock) -> None:
    background = Background(clock)
    cache: TtlCache[str] = TtlCache(2.0, background)
    load, loads = counting(["v1", "v2"])
    cache.get_or_load("k", load)
    clock.now += 1.5
    assert cache.peek("k") == "v1"  # its refresh is scheduled, and late (not run)
    clock.now += 0.5  # 2 s: the entry's TTL is over, refreshed or not
    assert cache.peek("k") is None and not cache.holds("k")
    assert cache.get_or_load("k", load) == "v2" and loads == ["v1", "v2"]  # loaded on the path
    background.run()  # the late refresh finds a newer entry: it loads nothing
    assert cache.peek("k") == "v2" and loads == ["v1", "v2"]
    clock.now += 1.9
    assert cache.peek("k") == "v2"  # the path's load counts


def test_an_idle_entry_is_not_refreshed_it_expires(clock: Clock) -> None:
    background = Background(clock)
    cache: TtlCache[str] = TtlCache(2.0, background)
    cache.get_or_load("k", lambda: "v")
    clock.now += 5
    assert cache.peek("k") is None and background.pending == []


def tick(clock: Clock, background: Background, until: float, step: float = 0.1) -> None:
    """Move the clock to ``until``, running the refreshes as they fall due."""
    while clock.now < until - 1e-9:
        clock.now = min(until, clock.now + step)
        background.run()


def test_an_entry_used_within_warm_s_stays_loaded_for_a_client_slower_than_the_ttl(clock: Clock) -> None:
    """A query each 2.5 s against a 2 s TTL (a model that computes for longer): without the
    warm window each request met its entry expired, never read within its life, so never
    refreshed, and loaded it on its path. Within ``warm_s`` of its last use it is loaded
    again in the background at 0.9 of each life, never served past the TTL; then it expires."""
    background = Background(clock)
    cache: TtlCache[str] = TtlCache(2.0, background, warm_s=10.0)
    load, loads = counting([f"v{n}" for n in range(1, 100)])
    assert cache.get_or_load("k", load) == "v1"  # loaded on the path: a use, so its refresh is due
    assert [round(at, 6) for at, _ in background.pending] == [1001.8]
    for query in range(1, 5):  # a client each 2.5 s
        tick(clock, background, 1000.0 + 2.5 * query)
        assert cache.peek("k") is not None, f"query {query} met an expired entry"
        entry = cache._entries["k"]
        assert clock.now - entry.loaded_at < 2.0  # never past its TTL from the load that read it
    assert cache.get_or_load("k", lambda: "never on the path") != "never on the path"
    last_use = clock.now
    tick(clock, background, last_use + 20.0)  # idle: loaded until warm_s after its last use, then left
    assert cache.peek("k") is None and background.pending == []
    # One load per 0.9 TTL (1.8 s) from the first until warm_s after the last use (20 s in
    # all), and the one past it that finds the window over: at most 13, then none.
    assert 11 <= len(loads) <= 2 + 20.0 / 1.8, loads


def test_without_a_warm_window_a_client_slower_than_the_ttl_loads_on_its_path(clock: Clock) -> None:
    """The old behaviour, kept at ``warm_s=0``: an entry is refreshed only when read within
    its life."""
    background = Background(clock)
    cache: TtlCache[str] = TtlCache(2.0, background)
    load, loads = counting(["v1", "v2", "v3"])
    cache.get_or_load("k", load)
    assert background.pending == []
    tick(clock, background, 1002.5)
    assert cache.peek("k") is None and loads == ["v1"]


def test_a_warm_entry_whose_refresh_fails_is_dropped_and_not_refreshed_again(clock: Clock) -> None:
    background = Background(clock)
    cache: TtlCache[str] = TtlCache(2.0, background, warm_s=30.0)
    calls = [0]

    def load() -> str:
        calls[0] += 1
        if calls[0] > 1:
            raise PermissionError("revoked")
        return "v"

    cache.get_or_load("k", load)
    tick(clock, background, 1001.9)
    assert cache.peek("k") is None and calls == [2]
    tick(clock, background, 1010.0)
    assert calls == [2] and background.pending == []


def test_a_refresh_that_fails_drops_the_entry_so_the_next_request_meets_the_failure(clock: Clock) -> None:
    background = Background(clock)
    cache: TtlCache[str] = TtlCache(2.0, background)
    revoked = [False]

    def load() -> str:
        if revoked[0]:
            raise PermissionError("revoked")
        return "grant"

    cache.get_or_load("k", load)
    clock.now += 1.8
    assert cache.peek("k") == "grant"
    revoked[0] = True  # changed in the database alone: nothing announced it
    background.run()
    assert cache.peek("k") is None  # dropped at once, before its TTL was over
    with pytest.raises(PermissionError):
        cache.get_or_load("k", load)


def test_a_refresh_across_an_announced_change_is_not_kept(clock: Clock) -> None:
    background = Background(clock)
    cache: TtlCache[str] = TtlCache(2.0, background)
    load, loads = counting(["old", "fresh"])
    cache.get_or_load("k", load)
    clock.now += 1.8
    cache.peek("k")
    cache.clear()  # a change announced while the refresh waited
    background.run()
    assert cache.peek("k") is None and loads == ["old"]
    assert cache.get_or_load("k", load) == "fresh"


def test_without_a_refresher_or_with_a_zero_ttl_it_caches_as_before(clock: Clock) -> None:
    plain: TtlCache[str] = TtlCache(2.0)
    load, loads = counting(["a", "b"])
    plain.get_or_load("k", load)
    clock.now += 1.9
    assert plain.get_or_load("k", load) == "a"
    clock.now += 0.1
    assert plain.get_or_load("k", load) == "b" and loads == ["a", "b"]
    off: TtlCache[str] = TtlCache(0.0, Background(clock))
    load, loads = counting(["x", "y"])
    assert off.get_or_load("k", load) == "x" and off.get_or_load("k", load) == "y"


def test_a_closed_refresher_leaves_the_entry_to_expire(clock: Clock) -> None:
    background = Background(clock)
    background.close()
    cache: TtlCache[str] = TtlCache(2.0, background)
    cache.get_or_load("k", lambda: "v")
    clock.now += 1.5
    assert cache.peek("k") == "v"  # served while live, with no refresh to come
    clock.now += 0.6
    assert cache.peek("k") is None


def test_the_refresher_thread_runs_calls_in_time_order_and_stops_when_closed() -> None:
    import threading
    import time

    refresher = Refresher("test-refresh")
    ran: list[str] = []
    done = threading.Event()
    now = time.monotonic()

    def late() -> None:
        ran.append("late")
        done.set()

    def failing() -> None:
        raise ValueError("a refresh that raises")

    refresher.schedule(now + 0.2, late)
    refresher.schedule(now + 0.05, lambda: ran.append("early"))
    refresher.schedule(now, failing)  # a failing call does not stop the thread
    assert done.wait(5)
    assert ran == ["early", "late"]
    refresher.close()
    assert not refresher.schedule(time.monotonic(), lambda: ran.append("after close"))
    time.sleep(0.05)
    assert ran == ["early", "late"]


def test_a_value_read_on_the_way_is_put_unless_newer_or_cleared(clock: Clock) -> None:
    background = Background(clock)
    cache: TtlCache[str] = TtlCache(2.0, background)
    epoch = cache.epoch
    cache.put("k", "from the grant", lambda: "reloaded", loaded_at=clock.now, epoch=epoch)
    assert cache.peek("k") == "from the grant"
    cache.put("k", "older", lambda: "x", loaded_at=clock.now - 1, epoch=epoch)
    assert cache.peek("k") == "from the grant"  # a newer entry wins
    clock.now += 1.8
    background.run()  # refreshed with the loader it was put with, not the value
    assert cache.peek("k") == "reloaded"
    stale = cache.epoch
    cache.clear()
    cache.put("k", "read before the clear", lambda: "x", loaded_at=clock.now, epoch=stale)
    assert cache.peek("k") is None


def test_a_slow_load_never_puts_an_older_state_back(clock: Clock) -> None:
    cache: TtlCache[str] = TtlCache(2.0)
    epoch = cache.epoch

    def slow_load() -> str:
        # while this request reads, a later read is stored (another request's, a refresh's)
        clock.now += 0.5
        cache.put("k", "newer", lambda: "x", loaded_at=clock.now, epoch=epoch)
        return "older"

    assert cache.get_or_load("k", slow_load) == "older"  # the request gets what it read ...
    assert cache.peek("k") == "newer"  # ... and the cache keeps the later read
