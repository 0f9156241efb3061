"""Plain-SQL schema migrations shipped by the service packages.

Files live at `services/<service>/migrations/<database>/NNNN_<name>.sql`, <database> being
`controlplane` or `runops`, one its `runops.registry` entry declares; files in
`migrations/all/` apply to every database the entry declares (one schema in several databases,
like the run store's tables in the LEGACY and NEW stores). `migrate()` applies
the ones not applied yet, service by service in the registry's order, each file in its own
transaction, under an advisory lock so concurrent starters (several replicas of a service) do
not race. Applied files are recorded in runops_schema_migrations. Operators run it with
`python -m runops.migrations --dsn postgresql://... --database runops`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from runops import registry

DATABASES = registry.DATABASES
# services/<service>/migrations/all/: applied to each database the service's entry lists.
EVERY_DATABASE = "all"
# Arbitrary but fixed: every migrator of every service takes this same advisory lock.
LOCK_KEY = 0x72756E6F7073  # "runops"
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS runops_schema_migrations (
    service text NOT NULL,
    version text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (service, version)
)
"""


class MigrationError(Exception):
    """A migration file is misnamed or failed to apply; the message names the file."""


@dataclass(frozen=True)
class Migration:
    service: str
    version: str  # the file name without .sql, e.g. "0001_create_runs"
    path: Path

    @property
    def label(self) -> str:
        return f"{self.service}/{self.version}"


def discover(database: str) -> list[Migration]:
    """Every migration file for the database, in the order they must apply."""
    if database not in DATABASES:
        raise ValueError(f"database must be one of {', '.join(DATABASES)}, got {database!r}")
    found: list[Migration] = []
    roots = registry.services_roots()
    for entry in registry.SERVICES:
        service = entry.name
        numbers: dict[str, Path] = {}
        for root in roots:
            directory = root / service / "migrations" / database
            files = sorted(directory.glob("*.sql")) if directory.is_dir() else []
            every = root / service / "migrations" / EVERY_DATABASE
            if database in entry.databases and every.is_dir():
                files += sorted(every.glob("*.sql"))
            if files and database not in entry.databases:
                # The registry is what says which databases a service needs: keep it true.
                raise MigrationError(
                    f"{directory} has migrations, but the registry entry of {service} "
                    f"(runops.registry) does not list database {database!r}"
                )
            for path in files:
                match = _FILE_NAME.match(path.name)
                if match is None:
                    raise MigrationError(
                        f"{path}: migration files must be named NNNN_lower_snake_name.sql"
                    )
                if match.group(1) in numbers:
                    raise MigrationError(
                        f"{path} and {numbers[match.group(1)]} share number {match.group(1)}: "
                        "renumber one of them"
                    )
                numbers[match.group(1)] = path
        found += [Migration(service, numbers[n].stem, numbers[n]) for n in sorted(numbers)]
    return found


async def migrate(dsn: str, database: str) -> list[str]:
    """Apply every pending migration for `database` ("controlplane" or "runops") at dsn.

    Returns the labels ("service/NNNN_name") applied by this call; [] when up to date.
    """
    migrations = discover(database)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        try:
            await conn.execute(_CREATE_TABLE)
            rows = await conn.fetch("SELECT service, version FROM runops_schema_migrations")
            done = {(r["service"], r["version"]) for r in rows}
            applied: list[str] = []
            for migration in migrations:
                if (migration.service, migration.version) in done:
                    continue
                await _apply(conn, migration)
                applied.append(migration.label)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    finally:
        await conn.close()


async def _apply(conn: asyncpg.Connection, migration: Migration) -> None:
    sql = migration.path.read_text()
    try:
        async with conn.transaction():
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO runops_schema_migrations (service, version) VALUES ($1, $2)",
                migration.service,
                migration.version,
            )
    except asyncpg.PostgresError as exc:
        raise MigrationError(
            f"migration {migration.label} ({migration.path}) failed and was rolled back: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runops.migrations",
        description="Apply pending runops SQL migrations to one database.",
    )
    parser.add_argument("--dsn", required=True, help="writer DSN, postgresql://user@host:port/db")
    parser.add_argument("--database", required=True, choices=DATABASES)
    args = parser.parse_args(argv)
    try:
        applied = asyncio.run(migrate(args.dsn, args.database))
    except (MigrationError, OSError, asyncpg.PostgresError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for label in applied:
        print(f"applied {label}")
    print(f"{args.database}: {len(applied)} migration(s) applied, schema up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
