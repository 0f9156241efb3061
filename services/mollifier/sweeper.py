"""The stale sweep (spec §4): reports entries buffered longer than a threshold (a metric and a
log line per environment), one sweeper at a time under a lease in Redis. It also repairs the
environments index (`MollifierBuffer.reindex`), since an index write can fail after its accept.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

import structlog
from prometheus_client import Gauge

from runops.kit.background import Worker
from services.mollifier.buffer import MollifierBuffer

log = structlog.get_logger("runops.mollifier.sweeper")

STALE_ENTRIES = Gauge(
    "mollifier_stale_entries",
    "Buffered entries older than the stale threshold, at the last sweep.",
    multiprocess_mode="max",
)
OLDEST_AGE = Gauge(
    "mollifier_oldest_entry_age_seconds",
    "Age of the oldest buffered entry, at the last sweep.",
    multiprocess_mode="max",
)


@dataclass
class SweepReport:
    stale: dict[str, int] = field(default_factory=dict)
    oldest_age: timedelta | None = None
    reindexed: int = 0


class StaleSweeper:
    def __init__(
        self,
        buffer: MollifierBuffer,
        *,
        threshold_seconds: float = 60.0,
        interval_seconds: float = 10.0,
        lease_seconds: float = 30.0,
    ) -> None:
        self.buffer = buffer
        self.threshold = timedelta(seconds=threshold_seconds)
        self.interval = interval_seconds
        self.lease_ms = int(lease_seconds * 1000)
        self.token = uuid.uuid4().hex

    async def hold_lease(self) -> bool:
        """Take or renew the lease; False while another sweeper holds it."""
        held = await self.buffer.scripts.call(
            "lease", [self.buffer.global_keys.sweep_lease], [self.token, self.lease_ms]
        )
        return bool(int(held))

    async def sweep_once(self) -> SweepReport | None:
        """None when another sweeper holds the lease."""
        if not await self.hold_lease():
            return None
        report = SweepReport(reindexed=await self.buffer.reindex())
        for environment_id in await self.buffer.environments():
            stats = await self.buffer.stats(environment_id)
            age = stats.oldest_age
            if age is not None and (report.oldest_age is None or age > report.oldest_age):
                report.oldest_age = age
            if age is None or age <= self.threshold:
                continue
            stale = await self.buffer.count_older(environment_id, stats.now - self.threshold)
            report.stale[environment_id] = stale
            log.warning(
                "stale buffered entries",
                environment_id=environment_id,
                stale=stale,
                depth=stats.depth,
                draining=stats.draining,
                oldest_age_seconds=round(age.total_seconds(), 1),
            )
        STALE_ENTRIES.set(sum(report.stale.values()))
        OLDEST_AGE.set(report.oldest_age.total_seconds() if report.oldest_age else 0)
        return report

    def worker(self) -> Worker:
        async def body() -> None:
            while True:
                await self.sweep_once()
                worker.ready.set()
                await asyncio.sleep(self.interval)

        worker = Worker("mollifier-stale-sweep", body)
        return worker
