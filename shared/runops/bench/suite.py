"""Every benchmark of spec §7 on one local stack, as rows of one table (`runops bench`).

Each benchmark module keeps its own program (`python -m runops.bench.<name>`) and its full
report; this module runs them one after the other with sizes that keep the whole under
10 minutes on 2 cores, and turns each result into `report.Row`s.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from runops.bench import profile
from runops.bench.report import Row

if TYPE_CHECKING:
    from runops.localstack import LocalStack

Progress = Callable[[str], None]
Size = Literal["full", "smoke"]
BENCHMARKS = ("controlplane", "runstore", "ingest", "mollifier")

# Per benchmark and size: the keyword arguments of its `run(stack, ...)`. "full" is what
# `runops bench` runs (the spec's sizes where it names one: 100,000 items, 20k triggers; timed
# phases of 10 s, shorter ones repeated 3 times: spec §7); "smoke" only proves every row comes
# out.
SIZES: dict[str, dict[Size, dict[str, Any]]] = {
    "controlplane": {
        "full": {"seconds": 10.0, "concurrency": 16, "keys": 64},
        "smoke": {"seconds": 0.3, "concurrency": 2, "keys": 2},
    },
    "runstore": {
        "full": {"seconds": 10.0, "batch_items": 100_000},
        "smoke": {
            "seconds": 0.3,
            "concurrency": 2,
            "runs": 20,
            "batch_items": 200,
            "batch_chunk": 50,
            "chunk": 50,
        },
    },
    "ingest": {
        "full": {"small": 20_000, "large_c1": 45, "large_c10": 450, "big": 100_000},
        "smoke": {"small": 50, "large_c1": 2, "large_c10": 4, "big": 100, "repetitions": 1},
    },
    "mollifier": {
        "full": {"triggers": 20_000},
        "smoke": {"triggers": 300, "callers": 8, "repetitions": 1},
    },
}


def controlplane_rows(result: Any) -> list[Row]:
    b = "control plane"
    floor, name = result.floor.per_second, "raw indexed lookup"
    return [
        Row.against(
            b, "ControlPlaneClient cached AuthenticateApiKey", result.client.per_second,
            "calls/s", floor, name, target=">= 10x", at_least=10,
        ),
        Row.against(b, "cached AuthenticateApiKey over gRPC", result.cached.per_second,
                    "calls/s", floor, name),
        # Spec §7: printed beside an empty RPC (health Check) on the same server.
        Row.against(b, "cached AuthenticateApiKey over gRPC", result.cached.per_second,
                    "calls/s", result.health.per_second, "empty RPC, same server"),
    ]  # fmt: skip


def runstore_rows(result: Any) -> list[Row]:
    b = "run store"
    writes = ">= 0.5 of unnest"
    # Layout kept by hand (fmt: skip): each row's arguments in figure / floor / target order.
    rows = [
        Row.against(
            b, "routed GetRun", result.get_run.per_second, "calls/s",
            result.bare_get_run.per_second, "bare grpc.aio servicer", target=">= 0.8 of bare",
            at_least=0.8,
        ),
        Row.against(b, "routed GetRun", result.get_run.per_second, "calls/s",
                    result.floor_read.per_second, "raw PK read"),
        # Issue 16's batched read (GetRuns) row goes here: rows/s beside raw asyncpg's read of
        # the same ids, target ">= 0.5 of raw asyncpg" (at_least=0.5).
        Row.against(b, "CreateRuns", result.create_runs.per_second, "runs/s",
                    result.floor_insert_runs.per_second, "unnest INSERT", target=writes,
                    at_least=0.5),
        Row.against(b, "AcceptBatchItems", result.accept.per_second, "items/s",
                    result.floor_insert_items.per_second, "unnest INSERT", target=writes,
                    at_least=0.5),
    ]  # fmt: skip
    # RUNOPS_PROCESSES=2: the same figures on a run store of two processes (same stack).
    if result.get_run_2 is not None:
        rows.append(Row.against(
            b, "routed GetRun, 2 processes", result.get_run_2.per_second, "calls/s",
            result.bare_get_run.per_second, "bare grpc.aio servicer", target=">= 0.8 of bare",
            at_least=0.8,
        ))  # fmt: skip
    if result.create_runs_2 is not None:
        rows.append(Row.against(
            b, "CreateRuns, 2 processes", result.create_runs_2.per_second, "runs/s",
            result.floor_insert_runs.per_second, "unnest INSERT", target=writes, at_least=0.5,
        ))  # fmt: skip
    batch = result.batch
    if batch.rss_tenth_kib and batch.rss_all_kib:
        rows.append(
            Row(
                b, f"service RSS at {batch.items:,} batch items", batch.rss_all_kib / 1024,
                "MiB", batch.rss_tenth_kib / 1024, f"at {batch.items // 10:,}",
                batch.rss_all_kib / batch.rss_tenth_kib,
            )
        )  # fmt: skip
    return rows


@dataclass(frozen=True)
class Outcome:
    name: str
    rows: list[Row]
    durability: dict[str, str]
    seconds: float
    missing: str = ""  # why the benchmark did not run (not built yet)


def _rows_of(name: str, result: Any) -> list[Row]:
    if name == "controlplane":
        return controlplane_rows(result)
    if name == "runstore":
        return runstore_rows(result)
    rows: list[Row] = result.rows()
    return rows


async def run_one(name: str, stack: LocalStack, size: Size, progress: Progress) -> Outcome:
    """One benchmark's rows, or why it did not run (its module or service is not there yet)."""
    import time

    from runops.bench.report import durability

    try:
        module = importlib.import_module(f"runops.bench.{name}")
    except ModuleNotFoundError as exc:
        return Outcome(name, [], {}, 0.0, missing=f"not built yet ({exc.name} not found)")
    started = time.monotonic()
    run: Callable[..., Awaitable[Any]] = module.run
    with profile.benchmark(name):
        result = await run(stack, progress=progress, **SIZES[name][size])
    seconds = time.monotonic() - started
    return Outcome(name, _rows_of(name, result), await durability(stack.runops_db.admin_writer_dsn),
                   seconds)  # fmt: skip
