"""StreamBatchItems' handshake: the service sends the initial metadata `runops-stream: open`
once the header's batch takes items, and a client sends items only after it.

Without it a client streaming items at a batch the service refuses (a bad API key, an unknown,
aborted or finished batch) writes after the answer, and grpc's asyncio client then reports
`INTERNAL: Internal error from Core` instead of the service's status (grpc/grpc#36066). Any
other answer comes with initial metadata lacking the marker: the client stops sending,
half-closes, and reads the status (the service answers a stream only after its half-close)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["STREAM_OPEN", "STREAM_OPEN_KEY", "is_open"]

STREAM_OPEN_KEY = "runops-stream"
STREAM_OPEN: tuple[tuple[str, str], ...] = ((STREAM_OPEN_KEY, "open"),)


def is_open(initial_metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Whether the service's initial metadata says the stream takes items."""
    return any(key == STREAM_OPEN_KEY for key, _ in initial_metadata or ())
