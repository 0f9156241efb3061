"""`runops batch stream FILE.ndjson`, `runops batch watch ID` and `runops demo batch`: the
batch ingest service from a shell, through `runops.ingest.client`.

NDJSON items, one per line: `{"task": "email/send", "payload": <any JSON>, "payload_type":
"application/json", "index": 7, "idempotency_key": "k"}`; only `task` is required (or
--task), `index` defaults to the line number (0-based), `payload` is sent as its JSON text.
The file is read lazily and read again to resend missing indexes (never held in memory); every
line is parsed once before the batch is created, so a bad line (`FILE:LINE: why`, exit 2) leaves
no batch behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from runops.cli.admin import ENV_FILE, read_env_file
from runops.cli.errors import UsageError

if TYPE_CHECKING:
    from runops.ingest.client import IngestClient
    from runops.ingest.v1 import ingest_pb2 as ing

TARGET_ENV = "RUNOPS_INGEST_TARGET"
KEY_ENVS = ("RUNOPS_API_KEY", "RUNOPS_DEMO_API_KEY")
DEMO_ITEMS = 10_000
DEMO_LARGE_EVERY = 500
DEMO_LARGE_BYTES = 600 * 1024  # above the default offload threshold (512 KiB)


def _common(parser: argparse.ArgumentParser) -> None:
    # Not `target`: runops.cli.main keeps the handler there.
    parser.add_argument(
        "--target", dest="ingest_target", help=f"ingest host:port (default: ${TARGET_ENV})"
    )
    parser.add_argument("--api-key", help=f"API key (default: ${KEY_ENVS[0]}, ${KEY_ENVS[1]})")
    parser.add_argument(
        "--state-dir",
        type=Path,
        help=f"a `runops up --state-dir`: read target and key from its {ENV_FILE}",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    stream = actions.add_parser("stream", help="create a batch and stream an NDJSON file into it")
    _common(stream)
    stream.add_argument("file", type=Path, help="items, one JSON object per line")
    stream.add_argument("--task", default="", help="task of lines without one")
    stream.add_argument("--idempotency-key", default="", help="Phase 1 key (default: random)")
    watch = actions.add_parser("watch", help="print a batch's progress until it is final")
    _common(watch)
    watch.add_argument("batch_id", help="batch_... (or the internal id)")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    demo = actions.add_parser(
        "batch", help=f"stream a {DEMO_ITEMS:,}-item batch (some large payloads) and show it"
    )
    _common(demo)


def _connection(args: argparse.Namespace) -> tuple[str, str]:
    saved: dict[str, str] = {}
    if args.state_dir is not None:
        path = args.state_dir / ENV_FILE
        if not path.is_file():
            raise UsageError(f"{path} not found: pass the --state-dir that `runops up` used")
        saved = dict(read_env_file(path))
    target = args.ingest_target or os.environ.get(TARGET_ENV) or saved.get(TARGET_ENV)
    key = args.api_key or next(
        (v for name in KEY_ENVS for v in (os.environ.get(name), saved.get(name)) if v), None
    )
    hint = f"(or source a `runops up` {ENV_FILE}, or pass --state-dir)"
    if not target:
        raise UsageError(f"no ingest target: pass --target or set {TARGET_ENV} {hint}")
    if not key:
        raise UsageError(f"no API key: pass --api-key or set {KEY_ENVS[0]} {hint}")
    return target, key


def _text(row: dict[str, Any], name: str, default: str = "") -> str:
    value = row.get(name, default)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {json.dumps(value)[:40]}")
    return value


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def parse_item(line: bytes, position: int, default_task: str) -> ing.BatchItem:
    """One NDJSON line as an item (`position`: its index unless it gives one); ValueError
    saying what is wrong with it."""
    from runops.common.v1 import common_pb2
    from runops.ingest.v1 import ingest_pb2 as ing

    try:
        row = json.loads(line, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {json.dumps(row)[:40]}")
    task = _text(row, "task") or default_task
    if not task:
        raise ValueError("no task (give one, or --task)")
    index = row.get("index", position)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 2**32:
        raise ValueError(f"index must be an integer from 0 to 2^32-1, got {json.dumps(index)}")
    return ing.BatchItem(
        index=index,
        task=task,
        payload=json.dumps(row.get("payload")).encode(),
        payload_type=_text(row, "payload_type", "application/json"),
        options=common_pb2.TriggerOptions(idempotency_key=_text(row, "idempotency_key")),
    )


class NdjsonItems:
    """The file's items, read again on every iteration (resends re-read it)."""

    def __init__(self, path: Path, default_task: str) -> None:
        self.path = path
        self.default_task = default_task

    def count(self) -> int:
        """The number of items, every line parsed: a bad line is a UsageError naming it before
        any batch exists (a line failing mid-stream would cancel the upload instead)."""
        try:
            return sum(1 for _ in self)
        except OSError as exc:
            raise UsageError(f"cannot read {self.path}: {exc}") from exc

    def __iter__(self) -> Iterator[ing.BatchItem]:
        with self.path.open("rb") as lines:
            position = 0
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    yield parse_item(line, position, self.default_task)
                except ValueError as exc:
                    raise UsageError(f"{self.path}:{number}: {exc}") from exc
                position += 1


class Progress:
    """A progress line on stderr (a bar on a terminal)."""

    def __init__(self, total: int, label: str) -> None:
        self.total = max(total, 1)
        self.label = label
        self.sent = 0
        self.started = time.monotonic()
        self._shown = 0.0

    def __call__(self, items: int) -> None:
        self.sent += items
        now = time.monotonic()
        if now - self._shown >= 0.1 or self.sent >= self.total:
            self._shown = now
            self.show()

    def show(self) -> None:
        share = min(self.sent / self.total, 1.0)
        rate = self.sent / max(time.monotonic() - self.started, 1e-6)
        bar = "#" * int(share * 30)
        end = "\r" if sys.stderr.isatty() else "\n"
        sys.stderr.write(
            f"{self.label} [{bar:<30}] {self.sent:,}/{self.total:,} items {rate:,.0f}/s{end}"
        )
        sys.stderr.flush()


def _describe(reply: ing.StreamBatchItemsResponse) -> str:
    from runops.common.v1 import common_pb2

    status = common_pb2.BatchStatus.Name(reply.status).removeprefix("BATCH_STATUS_")
    return (
        f"batch {reply.batch_id}: sealed={reply.sealed} status={status} "
        f"accepted={reply.accepted_count}/{reply.run_count} pre_failed={reply.pre_failed_count} "
        f"linked={reply.linked_count}"
    )


async def _stream(args: argparse.Namespace) -> int:
    from runops.ingest.client import IngestClient

    target, key = _connection(args)
    if not args.file.is_file():
        raise UsageError(f"{args.file} is not a file")
    source = NdjsonItems(args.file, args.task)
    total = source.count()
    if total == 0:
        raise UsageError(f"{args.file} holds no items")
    async with IngestClient(target, key) as client:
        progress = Progress(total, "streaming")
        result = await client.run_batch(
            total, source, idempotency_key=args.idempotency_key, progress=progress
        )
        sys.stderr.write("\n")
        print(_describe(result.response))
    return 0


async def _watch(args: argparse.Namespace) -> int:
    from runops.common.v1 import common_pb2
    from runops.ingest.client import IngestClient

    target, key = _connection(args)
    async with IngestClient(target, key) as client:
        async for batch in client.watch_batch(args.batch_id):
            status = common_pb2.BatchStatus.Name(batch.status).removeprefix("BATCH_STATUS_")
            print(
                f"{batch.friendly_id} {status} sealed={batch.sealed} "
                f"accepted={batch.accepted_count}/{batch.run_count} "
                f"completed={batch.completed_run_count} failed={batch.failed_run_count}",
                flush=True,
            )
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from runops.ingest.v1 import ingest_pb2 as ing

    target, key = _connection(args)

    def items() -> Iterator[ing.BatchItem]:
        for index in range(DEMO_ITEMS):
            large = index % DEMO_LARGE_EVERY == 0
            body = b"x" * DEMO_LARGE_BYTES if large else b""
            yield ing.BatchItem(
                index=index,
                task="demo/hello",
                payload=b'{"n":%d,"pad":"%s"}' % (index, body),
                payload_type="application/json",
            )

    async with _client(target, key) as client:
        progress = Progress(DEMO_ITEMS, "demo batch")
        result = await client.run_batch(DEMO_ITEMS, items, progress=progress)
        sys.stderr.write("\n")
        print(_describe(result.response))
        batch = await client.get_batch(result.batch_id)
        print(
            f"large payloads offloaded: {DEMO_ITEMS // DEMO_LARGE_EVERY} (every {DEMO_LARGE_EVERY}th item)"
        )
        print(f"status: sealed={batch.sealed} accepted={batch.accepted_count}/{batch.run_count}")
        print("first runs:")
        shown = 0
        async for outcome in client.list_batch_items(result.batch_id, page_size=5):
            outcome_name = ing.ItemOutcome.Name(outcome.outcome).removeprefix("ITEM_OUTCOME_")
            print(f"  item {outcome.index}: {outcome.run_id} ({outcome_name})")
            shown += 1
            if shown == 5:
                break
        print(f"watch it: runops batch watch {result.batch_id}")
    return 0


def _client(target: str, key: str) -> IngestClient:
    from runops.ingest.client import IngestClient

    return IngestClient(target, key)


def _run(handler: str, args: argparse.Namespace) -> int:
    from runops.ingest.client import IngestError

    try:
        return asyncio.run({"stream": _stream, "watch": _watch, "demo": _demo}[handler](args))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except IngestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def command(args: argparse.Namespace) -> int:
    return _run(args.action, args)


def demo_command(args: argparse.Namespace) -> int:
    return _run("demo", args)
