"""Client side of Phase 2: items into chunk messages bounded by count and bytes.

Items are pulled from an iterable or async iterable one at a time and handed on a chunk at a
time, so a 100,000-item batch is never held in memory: at most one chunk (plus the item that
did not fit in it) is. The byte bound is the serialized size of the `StreamBatchItemsRequest`
that carries the chunk, so a chunk of `max_bytes` fits a server whose RUNOPS_MAX_CHUNK_BYTES
(and gRPC message limit) is at least that. An item that alone exceeds the bound travels alone in
its own chunk: the server then decides (above its item maximum it becomes a pre-failed
PAYLOAD_TOO_LARGE run; above its message limit gRPC refuses the message).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import Generic, TypeVar, cast

from runops.ingest.v1 import ingest_pb2

T = TypeVar("T")

# Below the server's defaults (RUNOPS_MAX_CHUNK_ITEMS 1000, RUNOPS_MAX_CHUNK_BYTES 8 MiB).
DEFAULT_MAX_ITEMS = 1000
DEFAULT_MAX_BYTES = 4 * 1024 * 1024
# The request's own framing around the items: the `chunk` field's tag and length (<= 1 + 5).
_ENVELOPE_BYTES = 6


def _varint_size(value: int) -> int:
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def encoded_size(item: ingest_pb2.BatchItem) -> int:
    """Bytes `item` adds to an ItemChunk: its tag, its length and itself."""
    n = item.ByteSize()
    return 1 + _varint_size(n) + n


class _Chunker(Generic[T]):
    def __init__(self, max_items: int, max_bytes: int, size: Callable[[T], int] | None) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        if max_bytes <= _ENVELOPE_BYTES:
            raise ValueError(f"max_bytes must be > {_ENVELOPE_BYTES}, got {max_bytes}")
        self.max_items = max_items
        self.budget = max_bytes - _ENVELOPE_BYTES
        # Without `size`, items are BatchItem messages.
        self.size: Callable[[T], int] = size or cast(Callable[[T], int], encoded_size)
        self.chunk: list[T] = []
        self.used = 0

    def add(self, item: T) -> list[T] | None:
        """Adds `item`; returns the chunk it closed, if adding it closed one."""
        n = self.size(item)
        full: list[T] | None = None
        if self.chunk and self.used + n > self.budget:
            full, self.chunk, self.used = self.chunk, [], 0
        self.chunk.append(item)
        self.used += n
        if len(self.chunk) >= self.max_items:
            if full is not None:  # cannot happen with max_items >= 1 after a byte split
                raise AssertionError("two chunks closed by one item")
            full, self.chunk, self.used = self.chunk, [], 0
        return full

    def rest(self) -> list[T] | None:
        rest, self.chunk, self.used = self.chunk, [], 0
        return rest or None


def chunk_items(
    items: Iterable[T],
    *,
    max_items: int = DEFAULT_MAX_ITEMS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    size: Callable[[T], int] | None = None,
) -> Iterator[list[T]]:
    """Chunks of at most `max_items` items and `max_bytes` encoded bytes, lazily. `size`
    measures an item (default: a BatchItem's encoded size in an ItemChunk)."""
    chunker: _Chunker[T] = _Chunker(max_items, max_bytes, size)
    for item in items:
        full = chunker.add(item)
        if full is not None:
            yield full
    rest = chunker.rest()
    if rest is not None:
        yield rest


async def achunk_items(
    items: Iterable[T] | AsyncIterable[T],
    *,
    max_items: int = DEFAULT_MAX_ITEMS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    size: Callable[[T], int] | None = None,
) -> AsyncIterator[list[T]]:
    """`chunk_items` for an iterable or an async iterable."""
    if not isinstance(items, AsyncIterable):
        for chunk in chunk_items(items, max_items=max_items, max_bytes=max_bytes, size=size):
            yield chunk
        return
    chunker: _Chunker[T] = _Chunker(max_items, max_bytes, size)
    async for item in items:
        full = chunker.add(item)
        if full is not None:
            yield full
    rest = chunker.rest()
    if rest is not None:
        yield rest
