"""The control-plane database: reads (replica, LSN-guarded) and writes (writer, each write
announcing its invalidations through pg_notify in the same transaction)."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Sequence
from datetime import datetime

import asyncpg
from google.protobuf import timestamp_pb2

from runops.common.v1 import common_pb2
from runops.controlplane.model import WorkerResolution, hash_api_key
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.kit.errors import AlreadyExists, FailedPrecondition, FieldViolation, not_found
from runops.kit.ids import ENVIRONMENT, ORGANIZATION, PROJECT, WORKER, Residency, mint
from runops.kit.replica import DbConnection, ReplicaRouter
from services.controlplane.invalidation import Publisher
from services.controlplane.validation import Bootstrap, FlagChanges, TaskRow

_API_KEY_PREFIXES = {
    "DEVELOPMENT": "rk_dev_",
    "STAGING": "rk_stg_",
    "PREVIEW": "rk_prev_",
    "PRODUCTION": "rk_prod_",
}
# Characters of the secret part shown in Environment.api_key_prefix.
_SHOWN_SECRET_CHARS = 4

_ENVIRONMENT_COLUMNS = """
    e.id, e.slug, e.type, e.paused, e.created_at,
    o.id AS org_id, o.slug AS org_slug, o.title AS org_title, o.created_at AS org_created_at,
    p.id AS project_id, p.slug AS project_slug, p.name AS project_name,
    p.external_ref AS project_ref, p.created_at AS project_created_at,
    k.key_prefix
"""
_ENVIRONMENT_FROM = """
    FROM runtime_environments e
    JOIN projects p ON p.id = e.project_id
    JOIN organizations o ON o.id = e.organization_id
"""
_LIVE_KEY = "api_keys k ON k.environment_id = e.id AND k.revoked_at IS NULL"
SELECT_ENVIRONMENTS = (
    f"SELECT {_ENVIRONMENT_COLUMNS} {_ENVIRONMENT_FROM} LEFT JOIN {_LIVE_KEY}"
    " WHERE e.id = ANY($1::text[])"
)
SELECT_BY_KEY_HASH = (
    f"SELECT {_ENVIRONMENT_COLUMNS}, k.key_hash {_ENVIRONMENT_FROM} JOIN {_LIVE_KEY}"
    " WHERE k.key_hash = $1"
)
SELECT_WORKER = """
    SELECT w.id, w.environment_id, w.version, w.sdk_version, w.created_at,
           coalesce(e.type <> 'DEVELOPMENT' AND e.current_worker_id = w.id, false) AS current
    FROM background_workers w JOIN runtime_environments e ON e.id = w.environment_id
    WHERE w.environment_id = $1 AND CASE
        WHEN $2 <> '' THEN w.id = $2 OR w.version = $2
        WHEN e.type = 'DEVELOPMENT' THEN true
        ELSE w.id = e.current_worker_id
    END
    ORDER BY w.id = $2 DESC, w.created_at DESC, w.id DESC
    LIMIT 1
"""
SELECT_TASKS = """
    SELECT task_identifier, queue, default_ttl_ms, max_attempts, machine_preset
    FROM background_worker_tasks WHERE worker_id = $1 ORDER BY task_identifier
"""
SELECT_FLAGS = """
    SELECT id, mollifier_enabled, mollifier_shadow_mode, extra_flags
    FROM organizations WHERE id = $1
"""
SELECT_WORKER_ID = "SELECT id FROM background_workers WHERE environment_id = $1 AND version = $2"
LOCK_ENVIRONMENT = """
    SELECT id, organization_id, type FROM runtime_environments WHERE id = $1 FOR UPDATE
"""
INSERT_ORGANIZATION = """
    INSERT INTO organizations (id, slug, title) VALUES ($1, $2, $3)
    RETURNING id, slug, title, created_at
"""
INSERT_PROJECT = """
    INSERT INTO projects (id, organization_id, slug, name, external_ref)
    SELECT $1, id, $3, $4, $5 FROM organizations WHERE id = $2
    RETURNING id, organization_id, slug, name, external_ref, created_at
"""
INSERT_ENVIRONMENT = """
    INSERT INTO runtime_environments (id, project_id, organization_id, slug, type)
    SELECT $1, id, organization_id, $3, $4 FROM projects WHERE id = $2
    RETURNING id, organization_id
"""
INSERT_API_KEY = """
    INSERT INTO api_keys (id, environment_id, key_hash, key_prefix) VALUES ($1, $2, $3, $4)
"""
REVOKE_API_KEYS = """
    UPDATE api_keys SET revoked_at = now()
    WHERE environment_id = $1 AND revoked_at IS NULL
    RETURNING key_hash
"""
SET_PAUSED = """
    UPDATE runtime_environments SET paused = $2 WHERE id = $1 RETURNING organization_id
"""
SET_FLAGS = """
    UPDATE organizations SET
        mollifier_enabled = coalesce($2, mollifier_enabled),
        mollifier_shadow_mode = coalesce($3, mollifier_shadow_mode),
        extra_flags = (extra_flags || $4::jsonb) - $5::text[]
    WHERE id = $1
    RETURNING id, mollifier_enabled, mollifier_shadow_mode, extra_flags
"""
INSERT_WORKER = """
    INSERT INTO background_workers (id, environment_id, version, sdk_version)
    VALUES ($1, $2, $3, $4) ON CONFLICT (environment_id, version) DO NOTHING
    RETURNING id
"""
INSERT_WORKER_TASK = """
    INSERT INTO background_worker_tasks
        (worker_id, task_identifier, queue, default_ttl_ms, max_attempts, machine_preset)
    VALUES ($1, $2, $3, $4, $5, $6)
"""
PROMOTE_WORKER = """
    UPDATE runtime_environments e SET current_worker_id = w.id
    FROM background_workers w
    WHERE e.id = $1 AND w.id = $2 AND w.environment_id = e.id
    RETURNING w.id
"""


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def environment_from_row(row: asyncpg.Record) -> cp.Environment:
    return cp.Environment(
        id=row["id"],
        slug=row["slug"],
        type=common_pb2.EnvironmentType.Value(f"ENVIRONMENT_TYPE_{row['type']}"),
        paused=row["paused"],
        organization=cp.Organization(
            id=row["org_id"],
            slug=row["org_slug"],
            title=row["org_title"],
            created_at=timestamp(row["org_created_at"]),
        ),
        project=cp.Project(
            id=row["project_id"],
            organization_id=row["org_id"],
            slug=row["project_slug"],
            name=row["project_name"],
            external_ref=row["project_ref"],
            created_at=timestamp(row["project_created_at"]),
        ),
        api_key_prefix=row["key_prefix"] or "",
        created_at=timestamp(row["created_at"]),
    )


def organization_from_row(row: asyncpg.Record) -> cp.Organization:
    """An INSERT_ORGANIZATION row."""
    return cp.Organization(
        id=row["id"], slug=row["slug"], title=row["title"], created_at=timestamp(row["created_at"])
    )


def project_from_row(row: asyncpg.Record) -> cp.Project:
    """An INSERT_PROJECT row."""
    return cp.Project(
        id=row["id"],
        organization_id=row["organization_id"],
        slug=row["slug"],
        name=row["name"],
        external_ref=row["external_ref"],
        created_at=timestamp(row["created_at"]),
    )


def worker_from_row(row: asyncpg.Record) -> cp.BackgroundWorker:
    return cp.BackgroundWorker(
        id=row["id"],
        environment_id=row["environment_id"],
        version=row["version"],
        sdk_version=row["sdk_version"],
        current=row["current"],
        created_at=timestamp(row["created_at"]),
    )


def task_definition(row: TaskRow) -> cp.TaskDefinition:
    task = cp.TaskDefinition(
        task_identifier=row.task_identifier,
        queue=row.queue,
        max_attempts=row.max_attempts,
        machine_preset=row.machine_preset,
    )
    if row.default_ttl_ms is not None:
        task.default_ttl.FromMilliseconds(row.default_ttl_ms)
    return task


def task_from_record(record: asyncpg.Record) -> cp.TaskDefinition:
    """A SELECT_TASKS row: its columns are TaskRow's fields."""
    return task_definition(TaskRow(**dict(record)))


def flags_from_row(row: asyncpg.Record) -> cp.OrganizationFlags:
    return cp.OrganizationFlags(
        organization_id=row["id"],
        mollifier_enabled=row["mollifier_enabled"],
        mollifier_shadow_mode=row["mollifier_shadow_mode"],
        extra=json.loads(row["extra_flags"]),
    )


def new_api_key(environment_type: str) -> tuple[str, str]:
    """A fresh key (192 random bits) and the non-secret prefix shown for it."""
    prefix = _API_KEY_PREFIXES[environment_type]
    key = prefix + secrets.token_hex(24)
    return key, key[: len(prefix) + _SHOWN_SECRET_CHARS]


def _invalidation(kind: cp.InvalidationKind.ValueType, key: str, org: str) -> cp.Invalidation:
    return cp.Invalidation(kind=kind, key=key, organization_id=org)


async def _insert_organization(
    conn: DbConnection, invalidations: list[cp.Invalidation], slug: str, title: str
) -> cp.Organization:
    row = await conn.fetchrow(
        INSERT_ORGANIZATION, mint(ORGANIZATION, Residency.LEGACY), slug, title
    )
    assert row is not None
    invalidations.append(_invalidation(cp.INVALIDATION_KIND_ORGANIZATION, row["id"], row["id"]))
    return organization_from_row(row)


async def _insert_project(
    conn: DbConnection, organization_id: str, slug: str, name: str
) -> cp.Project:
    project_id = mint(PROJECT, Residency.LEGACY)
    external_ref = f"proj_{secrets.token_hex(10)}"
    row = await conn.fetchrow(INSERT_PROJECT, project_id, organization_id, slug, name, external_ref)
    if row is None:
        raise not_found("organization", organization_id, "organization_id")
    return project_from_row(row)


class ControlPlaneStore:
    def __init__(self, router: ReplicaRouter, publisher: Publisher) -> None:
        self.router = router
        self._publisher = publisher

    # -- reads ------------------------------------------------------------------------------
    async def environment_by_key_hash(self, key_hash: bytes) -> cp.Environment | None:
        row = await self.router.read(lambda conn: conn.fetchrow(SELECT_BY_KEY_HASH, key_hash))
        return None if row is None else environment_from_row(row)

    async def environments(self, ids: Sequence[str]) -> dict[str, cp.Environment]:
        """Many environments in one query; absent ids are simply not in the result."""
        rows = await self.router.read(lambda conn: conn.fetch(SELECT_ENVIRONMENTS, list(ids)))
        return {row["id"]: environment_from_row(row) for row in rows}

    async def worker(self, environment_id: str, worker: str) -> WorkerResolution | None:
        async def query(conn: DbConnection) -> WorkerResolution | None:
            row = await conn.fetchrow(SELECT_WORKER, environment_id, worker)
            if row is None:
                return None
            tasks = await conn.fetch(SELECT_TASKS, row["id"])
            return worker_from_row(row), tuple(task_from_record(t) for t in tasks)

        return await self.router.read(query)

    async def flags(self, organization_id: str) -> cp.OrganizationFlags | None:
        row = await self.router.read(lambda conn: conn.fetchrow(SELECT_FLAGS, organization_id))
        return None if row is None else flags_from_row(row)

    # -- writes -----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[tuple[DbConnection, list[cp.Invalidation]]]:
        """A write transaction; invalidations appended to the list are published with it (in
        the same transaction) and applied locally right after the commit."""
        invalidations: list[cp.Invalidation] = []
        # The router records the commit's WAL position: our own reads will not refill the
        # cache from a replica that lags it.
        async with self.router.transaction() as conn:
            yield conn, invalidations
            await self._publisher.publish(conn, invalidations)
        self._publisher.applied_locally(invalidations)

    async def create_organization(self, slug: str, title: str) -> cp.Organization:
        async with self._write() as (conn, invalidations):
            org = await _insert_organization(conn, invalidations, slug, title)
        return org

    async def create_project(self, organization_id: str, slug: str, name: str) -> cp.Project:
        async with self._write() as (conn, _):
            project = await _insert_project(conn, organization_id, slug, name)
        return project

    async def create_environment(
        self, project_id: str, slug: str, environment_type: str
    ) -> tuple[cp.Environment, str]:
        async with self._write() as (conn, invalidations):
            env_id, api_key = await self._insert_environment(
                conn, invalidations, project_id, slug, environment_type
            )
            env = await self._environment_on(conn, env_id)
        return env, api_key

    async def bootstrap_organization(
        self, plan: Bootstrap
    ) -> tuple[cp.Organization, cp.Project, list[tuple[cp.Environment, str]]]:
        """Organization, project, environments and their keys in one transaction: the same
        inserts as the single creates, so a failure anywhere leaves nothing behind."""
        async with self._write() as (conn, invalidations):
            org = await _insert_organization(conn, invalidations, plan.slug, plan.title)
            project = await _insert_project(conn, org.id, plan.project_slug, plan.project_name)
            keys: dict[str, str] = {}
            for slug, env_type in plan.environments:
                env_id, api_key = await self._insert_environment(
                    conn, invalidations, project.id, slug, env_type
                )
                keys[env_id] = api_key
            rows = await conn.fetch(SELECT_ENVIRONMENTS, list(keys))
        envs = {row["id"]: environment_from_row(row) for row in rows}
        return org, project, [(envs[env_id], key) for env_id, key in keys.items()]

    async def _insert_environment(
        self,
        conn: DbConnection,
        invalidations: list[cp.Invalidation],
        project_id: str,
        slug: str,
        environment_type: str,
    ) -> tuple[str, str]:
        """A new environment of `project_id` with its live API key: (id, key)."""
        new_id = mint(ENVIRONMENT, Residency.LEGACY)
        row = await conn.fetchrow(INSERT_ENVIRONMENT, new_id, project_id, slug, environment_type)
        if row is None:
            raise not_found("project", project_id, "project_id")
        env_id, org = row["id"], row["organization_id"]
        api_key = await self._insert_key(conn, env_id, environment_type)
        invalidations.append(_invalidation(cp.INVALIDATION_KIND_ENVIRONMENT, env_id, org))
        invalidations.append(
            _invalidation(cp.INVALIDATION_KIND_API_KEY, hash_api_key(api_key).hex(), org)
        )
        return env_id, api_key

    async def _insert_key(self, conn: DbConnection, env_id: str, env_type: str) -> str:
        api_key, shown = new_api_key(env_type)
        key_id = mint("apikey", Residency.LEGACY)
        await conn.execute(INSERT_API_KEY, key_id, env_id, hash_api_key(api_key), shown)
        return api_key

    async def _environment_on(self, conn: DbConnection, env_id: str) -> cp.Environment:
        row = await conn.fetchrow(SELECT_ENVIRONMENTS, [env_id])
        if row is None:
            raise not_found("environment", env_id, "environment_id")
        return environment_from_row(row)

    async def _lock_environment(self, conn: DbConnection, env_id: str) -> asyncpg.Record:
        row = await conn.fetchrow(LOCK_ENVIRONMENT, env_id)
        if row is None:
            raise not_found("environment", env_id, "environment_id")
        return row

    async def rotate_api_key(self, env_id: str) -> tuple[cp.Environment, str]:
        async with self._write() as (conn, invalidations):
            locked = await self._lock_environment(conn, env_id)
            org = locked["organization_id"]
            old = await conn.fetch(REVOKE_API_KEYS, env_id)
            api_key = await self._insert_key(conn, env_id, locked["type"])
            for row in old:
                invalidations.append(
                    _invalidation(cp.INVALIDATION_KIND_API_KEY, bytes(row["key_hash"]).hex(), org)
                )
            invalidations.append(
                _invalidation(cp.INVALIDATION_KIND_API_KEY, hash_api_key(api_key).hex(), org)
            )
            invalidations.append(_invalidation(cp.INVALIDATION_KIND_ENVIRONMENT, env_id, org))
            env = await self._environment_on(conn, env_id)
        return env, api_key

    async def set_paused(self, env_id: str, paused: bool) -> cp.Environment:
        async with self._write() as (conn, invalidations):
            org = await conn.fetchval(SET_PAUSED, env_id, paused)
            if org is None:
                raise not_found("environment", env_id, "environment_id")
            invalidations.append(_invalidation(cp.INVALIDATION_KIND_ENVIRONMENT, env_id, org))
            env = await self._environment_on(conn, env_id)
        return env

    async def set_flags(self, changes: FlagChanges) -> cp.OrganizationFlags:
        async with self._write() as (conn, invalidations):
            row = await conn.fetchrow(
                SET_FLAGS,
                changes.organization_id,
                changes.mollifier_enabled,
                changes.mollifier_shadow_mode,
                json.dumps(changes.set_extra),
                list(changes.remove_extra),
            )
            if row is None:
                raise not_found("organization", changes.organization_id, "organization_id")
            invalidations.append(
                _invalidation(cp.INVALIDATION_KIND_ORGANIZATION, row["id"], row["id"])
            )
        return flags_from_row(row)

    async def register_worker(
        self, env_id: str, version: str, sdk_version: str, tasks: Sequence[TaskRow]
    ) -> WorkerResolution:
        """Idempotent: registering the same version with the same tasks again returns the
        existing worker; the same version with different tasks is ALREADY_EXISTS."""
        async with self._write() as (conn, invalidations):
            locked = await self._lock_environment(conn, env_id)
            new_id = mint(WORKER, Residency.LEGACY)
            worker_id = await conn.fetchval(INSERT_WORKER, new_id, env_id, version, sdk_version)
            if worker_id is None:
                worker_id = await conn.fetchval(SELECT_WORKER_ID, env_id, version)
                created = False
            else:
                created = True
                await conn.executemany(
                    INSERT_WORKER_TASK,
                    [
                        (
                            worker_id,
                            t.task_identifier,
                            t.queue,
                            t.default_ttl_ms,
                            t.max_attempts,
                            t.machine_preset,
                        )
                        for t in tasks
                    ],
                )
                invalidations.append(
                    _invalidation(cp.INVALIDATION_KIND_WORKER, env_id, locked["organization_id"])
                )
            row = await conn.fetchrow(SELECT_WORKER, env_id, worker_id)
            assert row is not None
            stored = tuple(task_from_record(t) for t in await conn.fetch(SELECT_TASKS, worker_id))
        wanted = {t.task_identifier: task_definition(t) for t in tasks}
        if not created and {t.task_identifier: t for t in stored} != wanted:
            raise AlreadyExists(
                f"worker version {version!r} is already registered with different tasks; "
                "register a new version",
                reason="WORKER_VERSION_EXISTS",
                metadata={"worker_id": row["id"]},
                violations=[FieldViolation("version", "already registered with different tasks")],
            )
        return worker_from_row(row), stored

    async def promote_worker(self, env_id: str, worker_id: str) -> cp.BackgroundWorker:
        async with self._write() as (conn, invalidations):
            locked = await self._lock_environment(conn, env_id)
            if locked["type"] == "DEVELOPMENT":
                raise FailedPrecondition(
                    "DEVELOPMENT environments run their most recent worker; only deployed "
                    "environments promote one",
                    reason="PROMOTION_NOT_APPLICABLE",
                    violations=[FieldViolation("environment_id", "is a DEVELOPMENT environment")],
                )
            updated = await conn.fetchval(PROMOTE_WORKER, env_id, worker_id)
            if updated is None:
                raise not_found("worker", worker_id, "worker_id", f" in environment {env_id}")
            invalidations.append(
                _invalidation(cp.INVALIDATION_KIND_WORKER, env_id, locked["organization_id"])
            )
            row = await conn.fetchrow(SELECT_WORKER, env_id, worker_id)
            assert row is not None
        return worker_from_row(row)
