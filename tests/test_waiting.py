"""wait_until, driven by a fake clock: no test here sleeps for real."""

from __future__ import annotations

import pytest

from cipherpool.waiting import WaitTimeout, wait_until


class FakeTime:
    """A clock that only moves when the code under test sleeps; records each sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


def test_the_first_truthy_value_is_returned_without_sleeping_when_it_is_there(fake):
    assert wait_until(lambda: "ready", 5, clock=fake.clock, sleep=fake.sleep) == "ready"
    assert fake.sleeps == []


def test_it_polls_at_the_interval_until_the_condition_holds(fake):
    answers = iter([None, False, 0, "", {"port": 1}])
    assert wait_until(lambda: next(answers), 10, interval_s=0.5, clock=fake.clock, sleep=fake.sleep) == {"port": 1}
    assert fake.sleeps == [0.5] * 4


def test_a_timeout_raises_wait_timeout_after_a_last_check_at_the_deadline(fake):
    checked_at: list[float] = []

    def never() -> bool:
        checked_at.append(fake.now)
        return False

    with pytest.raises(WaitTimeout, match="within 1s") as raised:
        wait_until(never, 1, interval_s=0.3, clock=fake.clock, sleep=fake.sleep)
    assert isinstance(raised.value, TimeoutError)
    # Never sleeps past the deadline, and looks once more when it is reached
    assert fake.sleeps == pytest.approx([0.3, 0.3, 0.3, 0.1])
    assert checked_at[-1] == pytest.approx(1001.0) and len(checked_at) == 5


def test_the_caller_s_own_error_is_raised_on_timeout(fake):
    class NotReady(Exception):
        pass

    with pytest.raises(NotReady, match="see the log"):
        wait_until(lambda: None, 2, clock=fake.clock, sleep=fake.sleep, error=NotReady("see the log"))
    assert sum(fake.sleeps) == pytest.approx(2)


def test_the_condition_holding_at_the_deadline_still_counts(fake):
    assert wait_until(lambda: fake.now >= 1003, 3, interval_s=1, clock=fake.clock, sleep=fake.sleep) is True


def test_an_error_in_the_predicate_ends_the_wait_at_once(fake):
    def died() -> bool:
        raise RuntimeError("the child exited during start")

    with pytest.raises(RuntimeError, match="exited during start"):
        wait_until(died, 60, clock=fake.clock, sleep=fake.sleep, error=AssertionError("not this one"))
    assert fake.sleeps == []


def test_a_zero_timeout_checks_once(fake):
    calls: list[int] = []
    with pytest.raises(WaitTimeout):
        wait_until(lambda: calls.append(1), 0, clock=fake.clock, sleep=fake.sleep)
    assert calls == [1] and fake.sleeps == []
