"""A scratch database per test module on the run-ops writer, with the run tables migrated (the
data layer's tests); run-store servers on the session stack, split on and off (the service's).

The admin DSN is the one fixture DSN that may CREATE DATABASE today (the stack's superuser);
when least-privilege roles land, point ADMIN_DSN at whichever role keeps CREATEDB.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from runops.localstack import LocalStack, PostgresDatabase
from services.runstore.app import RunStoreApp
from tests.runstore.harness import Stub, start_on_stack, stub

MIGRATIONS = Path(__file__).parents[2] / "services" / "runstore" / "migrations" / "all"


def admin_dsn(db: PostgresDatabase) -> str:
    """A DSN allowed to create databases (the services' role is not)."""
    return db.admin_writer_dsn


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@pytest.fixture(scope="module")
async def scratch_dsn(runops_db: PostgresDatabase) -> AsyncIterator[str]:
    name = f"runstore_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_dsn(runops_db))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = with_database(admin_dsn(runops_db), name)
        conn = await asyncpg.connect(dsn)
        try:
            for path in sorted(MIGRATIONS.glob("*.sql")):
                await conn.execute(path.read_text())
        finally:
            await conn.close()
        yield dsn
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="module")
async def pool(scratch_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(scratch_dsn, min_size=1, max_size=12)
    try:
        yield pool
    finally:
        await pool.close()


# -- the service ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
async def run_store(stack: LocalStack) -> AsyncIterator[RunStoreApp]:
    """The split on: LEGACY rows in the control-plane database, NEW in the run-ops database."""
    started = await start_on_stack(stack, split=True)
    yield started
    await started.app.stop(grace=1)


@pytest.fixture(scope="session")
async def single_store(stack: LocalStack) -> AsyncIterator[RunStoreApp]:
    """The split off: everything in the control-plane database, ids minted LEGACY."""
    started = await start_on_stack(stack, split=False)
    yield started
    await started.app.stop(grace=1)


@pytest.fixture(scope="session")
def client(run_store: RunStoreApp) -> Stub:
    return stub(run_store.app.target)


@pytest.fixture(scope="session")
def single(single_store: RunStoreApp) -> Stub:
    return stub(single_store.app.target)
