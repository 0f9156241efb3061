"""One normalization of dependency failures into domain errors, whichever database or store
raised them (spec §3): the same failure answers the same way everywhere."""

from __future__ import annotations

import asyncpg
import grpc
import redis.exceptions

from runops.kit.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    RunopsError,
    Unavailable,
    details_of,
)

# Suggested client back-off for a dependency that is down or saturated.
RETRY_AFTER_SECONDS = 1.0

# The client side of a connection that died, or of a server that is gone, restarting or not
# answering. asyncpg raises several kinds for one stop: AdminShutdownError in flight,
# ConnectionDoesNotExistError, InterfaceError, or InternalClientError ("cannot switch to state
# …; another operation is in progress") when a pool releases a connection its server just
# closed; OSError (refused, reset) and TimeoutError (a hung server, a saturated pool) on acquire.
POSTGRES_CONNECTION_FAILURES: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)
# InterfaceErrors that are our own mistakes (an argument of the wrong type, a bad DSN), not a
# dying connection: retrying cannot help, so they stay INTERNAL.
_POSTGRES_CLIENT_BUGS = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.ClientConfigurationError,
    asyncpg.exceptions.UnsupportedClientFeatureError,
)
_POSTGRES_UNAVAILABLE: tuple[type[Exception], ...] = (
    *POSTGRES_CONNECTION_FAILURES,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
)


def is_connection_failure(exc: BaseException) -> bool:
    """A dying connection or an unreachable, restarting or hung Postgres server: a replica read
    goes to the writer instead; on the writer it answers UNAVAILABLE with RetryInfo."""
    return isinstance(exc, POSTGRES_CONNECTION_FAILURES) and not isinstance(
        exc, _POSTGRES_CLIENT_BUGS
    )


_REDIS_UNAVAILABLE = (
    redis.exceptions.ConnectionError,
    # READONLY: a replica answered a write (a failover demoted the node under the client, or a
    # stale endpoint): unavailable for writes until the client reaches the new primary.
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MasterDownError,
)


def _constraint_metadata(constraint: str, table: str) -> dict[str, str]:
    return {"constraint": constraint, "table": table} if constraint or table else {}


def unique_violation(constraint: str, table: str) -> AlreadyExists:
    """What a unique violation answers, whether Postgres raised it or a statement skipped the
    row and the caller found the holder: the same status, reason and metadata."""
    return AlreadyExists(
        f"a row with the same key already exists ({constraint or 'unique constraint'})",
        reason="UNIQUE_VIOLATION",
        metadata=_constraint_metadata(constraint, table),
    )


def postgres_error(exc: BaseException) -> RunopsError | None:
    constraint = getattr(exc, "constraint_name", None) or ""
    table = getattr(exc, "table_name", None) or ""
    meta = _constraint_metadata(constraint, table)
    if isinstance(exc, asyncpg.exceptions.UniqueViolationError):
        return unique_violation(constraint, table)
    if isinstance(exc, asyncpg.exceptions.ForeignKeyViolationError):
        return FailedPrecondition(
            f"a referenced row does not exist ({constraint or 'foreign key'})",
            reason="FOREIGN_KEY_VIOLATION",
            metadata=meta,
        )
    if isinstance(exc, asyncpg.exceptions.CheckViolationError):
        return InvalidArgument(
            f"a value breaks a database rule ({constraint or 'check'})",
            reason="CHECK_VIOLATION",
            metadata=meta,
        )
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError):
        return DeadlineExceeded("the database statement timed out", reason="STATEMENT_TIMEOUT")
    if isinstance(
        exc,
        asyncpg.exceptions.SerializationError | asyncpg.exceptions.DeadlockDetectedError,
    ):
        return Aborted(
            "the transaction conflicted with another; retry it",
            reason="SERIALIZATION_FAILURE",
            retry_after=0.05,
        )
    if isinstance(exc, _POSTGRES_CLIENT_BUGS):
        return None
    # OSError (refused, reset, timed out) is everyone's: dependency_error maps it.
    if isinstance(exc, _POSTGRES_UNAVAILABLE) and not isinstance(exc, OSError):
        return Unavailable(
            "the database is unavailable; retry shortly",
            reason="DATABASE_UNAVAILABLE",
            retry_after=RETRY_AFTER_SECONDS,
        )
    return None


def downstream_error(exc: grpc.aio.AioRpcError) -> RunopsError | None:
    """A call to another runops service failed and the handler did not translate it: transient
    failures stay retryable for our caller; anything else is our bug (None -> INTERNAL)."""
    code = exc.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(
            "a downstream service ran out of time", reason="DOWNSTREAM_DEADLINE"
        )
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    ):
        retry = details_of(exc).retry_after
        return Unavailable(
            f"a downstream service is unavailable ({code.name}); retry shortly",
            reason="DOWNSTREAM_UNAVAILABLE",
            retry_after=retry if retry is not None else RETRY_AFTER_SECONDS,
        )
    return None


def dependency_error(exc: BaseException) -> RunopsError | None:
    """Map a dependency's exception to a domain error; None when it is not a known failure."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return downstream_error(exc)
    mapped = postgres_error(exc)
    if mapped is not None:
        return mapped
    if isinstance(exc, _REDIS_UNAVAILABLE):
        return Unavailable(
            "redis is unavailable; retry shortly",
            reason="REDIS_UNAVAILABLE",
            retry_after=RETRY_AFTER_SECONDS,
        )
    if isinstance(exc, TimeoutError):
        # asyncpg pool acquire and redis pool waits time out like this when saturated.
        return Unavailable(
            "a dependency did not answer in time (pool exhausted?); retry shortly",
            reason="DEPENDENCY_TIMEOUT",
            retry_after=RETRY_AFTER_SECONDS,
        )
    if isinstance(exc, ConnectionError | OSError):
        return Unavailable(
            "a dependency is unreachable; retry shortly",
            reason="DEPENDENCY_UNREACHABLE",
            retry_after=RETRY_AFTER_SECONDS,
        )
    return None
