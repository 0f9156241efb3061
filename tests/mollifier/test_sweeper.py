"""The stale sweep: one sweeper at a time, stale entries counted per environment."""

from __future__ import annotations

from datetime import timedelta

from services.mollifier.buffer import MollifierBuffer
from services.mollifier.sweeper import STALE_ENTRIES, StaleSweeper
from tests.mollifier.helpers import now, snapshot


async def test_one_sweeper_holds_the_lease_and_reports_old_entries(buffer: MollifierBuffer) -> None:
    for age in (120, 90, 5):
        await buffer.accept(snapshot("env_old"), created_at=now() - timedelta(seconds=age))
    await buffer.accept(snapshot("env_new"), created_at=now())
    first = StaleSweeper(buffer, threshold_seconds=60, lease_seconds=5)
    second = StaleSweeper(buffer, threshold_seconds=60, lease_seconds=5)

    report = await first.sweep_once()
    assert report is not None
    assert report.stale == {"env_old": 2}
    assert report.oldest_age is not None
    assert report.oldest_age >= timedelta(seconds=120)
    assert STALE_ENTRIES._value.get() == 2
    assert await second.sweep_once() is None  # the lease is taken
    assert await first.sweep_once() is not None  # renewed by its holder
