"""The client-side chunker: bounds by count and encoded bytes, laziness over 100,000 items from
a generator (sync and async), the request stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from runops.ingest.chunking import achunk_items, chunk_items, encoded_size
from runops.ingest.v1 import ingest_pb2

N = 100_000


def item(index: int, payload_bytes: int = 100) -> ingest_pb2.BatchItem:
    return ingest_pb2.BatchItem(
        index=index, task="email/send", payload=b"x" * payload_bytes, payload_type="text/plain"
    )


class Source:
    """Makes items on demand and counts how many were pulled."""

    def __init__(self, n: int = N) -> None:
        self.n = n
        self.pulled = 0

    def sync(self) -> Iterator[ingest_pb2.BatchItem]:
        for i in range(self.n):
            self.pulled += 1
            yield item(i, 50 + i % 200)

    async def asynchronous(self) -> AsyncIterator[ingest_pb2.BatchItem]:
        for i in self.sync():
            yield i


def chunk_request_size(chunk: list[ingest_pb2.BatchItem]) -> int:
    return ingest_pb2.StreamBatchItemsRequest(chunk=ingest_pb2.ItemChunk(items=chunk)).ByteSize()


def test_encoded_size_is_exact() -> None:
    for items in ([item(0)], [item(1, 0), item(2, 300)], [item(i, 20_000) for i in range(3)]):
        assert sum(encoded_size(i) for i in items) == ingest_pb2.ItemChunk(items=items).ByteSize()


def test_100k_items_lazily_within_both_bounds() -> None:
    source = Source()
    max_items, max_bytes = 500, 32 * 1024
    consumed = 0
    for chunk in chunk_items(source.sync(), max_items=max_items, max_bytes=max_bytes):
        # Never pulled ahead of what it hands on by more than one chunk and one item.
        assert source.pulled - consumed <= len(chunk) + 1
        assert 1 <= len(chunk) <= max_items
        assert chunk_request_size(chunk) <= max_bytes
        assert [i.index for i in chunk] == list(range(consumed, consumed + len(chunk)))
        consumed += len(chunk)
    assert consumed == source.pulled == N


async def test_100k_items_from_an_async_generator() -> None:
    source = Source()
    consumed = 0
    chunks = 0
    async for chunk in achunk_items(source.asynchronous(), max_items=1000, max_bytes=1 << 20):
        assert source.pulled - consumed <= len(chunk) + 1
        assert len(chunk) <= 1000
        assert chunk_request_size(chunk) <= 1 << 20
        consumed += len(chunk)
        chunks += 1
    assert consumed == N
    assert chunks == N // 1000  # items are small: the count bound decides here


async def test_a_plain_iterable_works_in_the_async_variant() -> None:
    chunks = [c async for c in achunk_items([item(i) for i in range(5)], max_items=2)]
    assert [[i.index for i in c] for c in chunks] == [[0, 1], [2, 3], [4]]


def test_the_byte_bound_splits_and_an_oversized_item_travels_alone() -> None:
    items = [item(0, 400), item(1, 400), item(2, 5000), item(3, 10), item(4, 400)]
    chunks = list(chunk_items(iter(items), max_items=100, max_bytes=1000))
    assert [[i.index for i in c] for c in chunks] == [[0, 1], [2], [3, 4]]
    assert all(chunk_request_size(c) <= 1000 for c in chunks if len(c) > 1)


def test_generic_items_with_a_size_function() -> None:
    words = ["a" * n for n in (3, 3, 3, 8, 1)]
    chunks = list(chunk_items(words, max_items=10, max_bytes=16, size=len))
    assert chunks == [["aaa", "aaa", "aaa"], ["aaaaaaaa", "a"]]


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="max_items"):
        list(chunk_items([item(0)], max_items=0))
    with pytest.raises(ValueError, match="max_bytes"):
        list(chunk_items([item(0)], max_bytes=6))
