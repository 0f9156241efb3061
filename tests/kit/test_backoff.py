"""The kit's backoff policy and retry helper."""

from __future__ import annotations

import itertools

import pytest

from runops.kit.backoff import ExponentialBackoff, Retry


def test_delays_double_from_base_up_to_cap() -> None:
    backoff = ExponentialBackoff(base=0.1, cap=1.0)
    delays = list(itertools.islice(backoff.delays(), 6))
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    # Far past the cap (no float overflow either).
    assert backoff.compute(10_000) == 1.0
    # Zero or negative counts as the first failure.
    assert backoff.compute(0) == pytest.approx(0.1)


def test_jitter_stays_within_its_range_and_never_exceeds_the_cap() -> None:
    backoff = ExponentialBackoff(base=0.1, cap=2.0, jitter=0.5)
    for failures in (1, 3, 5, 50):
        nominal = backoff.nominal(failures)
        samples = [backoff.compute(failures) for _ in range(2000)]
        assert all(nominal * 0.5 <= s <= nominal <= 2.0 for s in samples)
        # Spread over the range, not one value: both halves of it are drawn.
        assert min(samples) < nominal * 0.6
        assert max(samples) > nominal * 0.9


def test_no_jitter_is_deterministic() -> None:
    backoff = ExponentialBackoff(base=0.25, cap=1.0, jitter=0.0)
    assert {backoff.compute(2) for _ in range(100)} == {0.5}


@pytest.mark.parametrize(
    ("base", "cap", "jitter"), [(0, 1, 0), (-1, 1, 0), (2, 1, 0), (0.1, 1, -0.1), (0.1, 1, 1.5)]
)
def test_nonsense_is_refused(base: float, cap: float, jitter: float) -> None:
    with pytest.raises(ValueError, match=r"base|jitter"):
        ExponentialBackoff(base=base, cap=cap, jitter=jitter)


async def test_retry_until_success() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("not yet")
        return "done"

    retry = Retry(ExponentialBackoff(base=0.001, cap=0.01), attempts=5)
    assert await retry.call(flaky) == "done"
    assert calls == 3


async def test_retry_gives_up_after_its_attempts_with_the_last_error() -> None:
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError(f"attempt {calls}")

    retry = Retry(ExponentialBackoff(base=0.001, cap=0.01), attempts=3)
    with pytest.raises(ConnectionError, match="attempt 3"):
        await retry.call(down)
    assert calls == 3


async def test_retry_does_not_retry_other_errors() -> None:
    calls = 0

    async def bug() -> None:
        nonlocal calls
        calls += 1
        raise KeyError("a bug")

    retry = Retry(ExponentialBackoff(base=0.001, cap=0.01), attempts=0, retry_on=(OSError,))
    with pytest.raises(KeyError):
        await retry.call(bug)
    assert calls == 1


class _Refused(Exception):
    def __init__(self, permanent: bool, hint: float | None = None) -> None:
        super().__init__("permanent" if permanent else "transient")
        self.permanent = permanent
        self.hint = hint


class _GaveUp(Exception):
    pass


def _policy(**kwargs: object) -> Retry:
    return Retry(
        ExponentialBackoff(base=0.001, cap=0.01),
        is_retryable=lambda exc: isinstance(exc, _Refused) and not exc.permanent,
        delay_hint=lambda exc: exc.hint if isinstance(exc, _Refused) else None,
        **kwargs,  # type: ignore[arg-type]
    )


async def test_retry_asks_is_retryable_and_stops_at_a_permanent_error() -> None:
    answers = [_Refused(False), _Refused(False), _Refused(True), _Refused(False)]

    async def call() -> None:
        raise answers.pop(0)

    with pytest.raises(_Refused, match="permanent"):
        await _policy(attempts=0).call(call)
    assert len(answers) == 1  # the permanent refusal was not retried


async def test_retry_waits_what_the_server_hints_over_its_backoff() -> None:
    retry = _policy(attempts=5)
    assert retry.delay(_Refused(False, hint=0.25), 1) == 0.25
    # No hint, or a useless one: the backoff's own delay.
    assert retry.delay(_Refused(False), 1) == pytest.approx(0.001)
    assert retry.delay(_Refused(False, hint=0.0), 3) == pytest.approx(0.004)


async def test_retry_raises_its_exhausted_error_from_the_last_failure() -> None:
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise _Refused(False)

    retry = _policy(attempts=3, exhausted=lambda exc, n: _GaveUp(f"{n} failures"))
    with pytest.raises(_GaveUp, match="3 failures") as caught:
        await retry.call(down)
    assert isinstance(caught.value.__cause__, _Refused)
    assert calls == 3


async def test_retry_budget_stops_before_a_wait_that_would_overrun_it() -> None:
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise _Refused(False, hint=0.05)

    # 0.12 s of budget fits two waits of 0.05 s, not a third.
    with pytest.raises(_Refused):
        await _policy(attempts=0, budget=0.12).call(down)
    assert calls == 3


def test_retry_refuses_a_negative_policy() -> None:
    with pytest.raises(ValueError, match="attempts"):
        Retry(ExponentialBackoff(), attempts=-1)
    with pytest.raises(ValueError, match="budget"):
        Retry(ExponentialBackoff(), budget=-1.0)
