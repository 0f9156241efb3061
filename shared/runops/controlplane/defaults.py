"""Task defaults (spec §4), used by the mollifier's Trigger and by ingest's batch items: a run
takes the queue, TTL, max attempts and machine preset it does not set from its task in the
environment's current worker version (DEVELOPMENT: the most recent worker; deployed: the
promoted one; a run with `options.lock_to_version`: that worker), read through
`ControlPlaneClient`'s cache, and records that worker's version (`RunInput.worker_version`).

The run store decides between them: an explicit option wins, a default fills the gap, and a run
with neither gets the platform default (no queue name, no TTL, max attempts and machine preset
0/empty: the consumer's own). A task the worker lacks, an environment with no worker yet or a
control plane that does not answer leave the defaults unset (platform defaults), counted and
logged (at most once a minute per environment and case, never per item), never refused:
defaults must not fail a trigger or a batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Sequence

import grpc
import structlog
from prometheus_client import Counter

from runops.controlplane.client import ControlPlaneClient
from runops.controlplane.model import WorkerResolution
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.kit.errors import FailedPrecondition, InvalidArgument, NotFound, RunopsError
from runops.runstore.v1 import runstore_pb2 as rs

log = structlog.get_logger("runops.controlplane.defaults")

TASK_DEFAULTS = Counter(
    "runops_task_defaults_total",
    "Runs by where their task defaults came from (worker; unknown_task, no_worker, "
    "unavailable: the platform defaults).",
    ["outcome"],
)
# A control plane slower than this costs the trigger or unit no more: platform defaults.
RESOLVE_TIMEOUT_SECONDS = 1.0
# A fallback is logged at most this often per environment and case: an environment without a
# worker would otherwise log every trigger (info lines at trigger rates).
LOG_INTERVAL_SECONDS = 60.0
LOG_MEMORY = 10_000


class TaskDefaults:
    def __init__(
        self, control_plane: ControlPlaneClient, *, timeout_seconds: float = RESOLVE_TIMEOUT_SECONDS
    ) -> None:
        self._control_plane = control_plane
        self._timeout = timeout_seconds
        self._logged = _LogThrottle(LOG_INTERVAL_SECONDS, LOG_MEMORY)

    async def fill(
        self,
        environment_id: str,
        runs: Sequence[rs.RunInput],
        *,
        counts: Sequence[int] | None = None,
    ) -> None:
        """Sets each run's `worker_version` and `default_*` from its task, with one cached
        resolution per worker the runs lock to (one for a trigger or a usual chunk). A run left
        to the platform defaults is counted; why is logged (never once per item). `counts`: how
        many runs each of `runs` stands for (a prototype per distinct task), for the count."""
        weights = [1] * len(runs) if counts is None else counts
        by_worker: dict[str, list[tuple[rs.RunInput, int]]] = {}
        for run, weight in zip(runs, weights, strict=True):
            by_worker.setdefault(run.options.lock_to_version, []).append((run, weight))
        for worker, group in by_worker.items():
            total = sum(weight for _, weight in group)
            resolution = await self._resolve(environment_id, worker)
            if isinstance(resolution, str):
                TASK_DEFAULTS.labels(resolution).inc(total)
                continue
            resolved, tasks = resolution
            wanted = {run.task_identifier for run, _ in group}
            found = {t.task_identifier: t for t in tasks if t.task_identifier in wanted}
            applied = 0
            for run, weight in group:
                task = found.get(run.task_identifier)
                if task is not None:
                    _fill(run, resolved.version, task)
                    applied += weight
            TASK_DEFAULTS.labels("worker").inc(applied)
            if applied == total:
                continue
            TASK_DEFAULTS.labels("unknown_task").inc(total - applied)
            unknown = sorted(wanted - found.keys())
            if fresh := [t for t in unknown if self._logged.first((environment_id, "task", t))]:
                log.info(
                    "unknown task: platform defaults",
                    environment_id=environment_id,
                    worker_version=resolved.version,
                    tasks=fresh,
                )

    async def _resolve(self, environment_id: str, worker: str) -> WorkerResolution | str:
        """The worker and its tasks, or why there is none to use (logged)."""
        try:
            async with asyncio.timeout(self._timeout):
                return await self._control_plane.resolve_worker_version(
                    environment_id, worker=worker
                )
        except (InvalidArgument, NotFound, FailedPrecondition) as err:
            # No worker yet, or none that `lock_to_version` names.
            if self._logged.first((environment_id, "no_worker", worker)):
                log.info(
                    "no worker to take task defaults from: platform defaults",
                    environment_id=environment_id,
                    worker=worker,
                    reason=err.reason,
                )
            return "no_worker"
        except (RunopsError, grpc.aio.AioRpcError, TimeoutError) as err:
            if self._logged.first((environment_id, "unavailable", worker)):
                log.warning(
                    "control plane unavailable for task defaults: platform defaults",
                    environment_id=environment_id,
                    worker=worker,
                    error=repr(err),
                )
            return "unavailable"


class _LogThrottle:
    """Which cases were logged lately: each at most once per `interval` seconds, the
    `max_entries` most recent remembered."""

    def __init__(self, interval: float, max_entries: int) -> None:
        self._interval = interval
        self._max_entries = max_entries
        self._at: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    def first(self, case: tuple[str, str, str]) -> bool:
        """True (and remembered) when `case` was not logged within the interval."""
        now = time.monotonic()
        last = self._at.get(case)
        if last is not None and now - last < self._interval:
            return False
        self._at[case] = now
        self._at.move_to_end(case)
        if len(self._at) > self._max_entries:
            self._at.popitem(last=False)
        return True


def _fill(run: rs.RunInput, version: str, task: cp.TaskDefinition) -> None:
    run.worker_version = version
    run.default_queue = task.queue
    run.default_max_attempts = task.max_attempts
    run.default_machine_preset = task.machine_preset
    if task.HasField("default_ttl"):
        run.default_ttl.CopyFrom(task.default_ttl)
