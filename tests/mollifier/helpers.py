"""Snapshots for the mollifier tests, and buffering them."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from runops.common.v1 import common_pb2
from runops.kit.ids import Residency, mint
from runops.runstore.v1 import runstore_pb2
from services.mollifier.buffer import MollifierBuffer


def snapshot(
    environment_id: str,
    *,
    organization_id: str = "org_1",
    task: str = "send-email",
    idempotency_key: str = "",
    key_ttl: timedelta | None = None,
    tags: tuple[str, ...] = (),
) -> runstore_pb2.RunInput:
    options = common_pb2.TriggerOptions(idempotency_key=idempotency_key, tags=list(tags))
    if key_ttl is not None:
        options.idempotency_key_ttl.FromTimedelta(key_ttl)
    return runstore_pb2.RunInput(
        run_id=mint("run", Residency.NEW),
        environment_id=environment_id,
        organization_id=organization_id,
        project_id="proj_1",
        task_identifier=task,
        payload=b'{"to": "a@example.com"}',
        payload_type="application/json",
        options=options,
    )


def now() -> datetime:
    """The clock at millisecond precision (what the buffer stores)."""
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


async def accept_all(buffer: MollifierBuffer, snaps: Iterable[runstore_pb2.RunInput]) -> None:
    """Buffers each snapshot in turn, created now."""
    for snap in snaps:
        await buffer.accept(snap, created_at=now())
