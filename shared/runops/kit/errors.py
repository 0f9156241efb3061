"""Domain errors and their rich gRPC statuses (google.rpc BadRequest / ErrorInfo / RetryInfo).

Handlers raise a RunopsError subclass; the server interceptor turns it into a status whose
details name the offending field, give a stable reason and, for retryable refusals, a delay.
Clients read those details back with `details_of`.

A status travels in trailers, which a default grpcio client accepts only up to 8 KiB: a request
with a thousand bad values must still get its INVALID_ARGUMENT. So `rich_status` keeps the
message short, lists at most MAX_LISTED_VIOLATIONS field violations within a byte budget (each
field path and description cut short) and says in ErrorInfo metadata `omitted_violations` how
many it left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "runops.dev"
# Bounds that keep every status far below the 8 KiB trailer limit of default clients.
MAX_MESSAGE_CHARS = 256
MAX_LISTED_VIOLATIONS = 20
MAX_FIELD_CHARS = 128
MAX_DESCRIPTION_CHARS = 200
MAX_METADATA_VALUE_CHARS = 200
# Serialized google.rpc details (grpc-status-details-bin, base64 on the wire: x4/3).
DETAILS_BUDGET_BYTES = 3000
# Fields a message names before "and N more".
NAMED_FIELDS = 3


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class RunopsError(Exception):
    """Base of every error a handler may raise on purpose."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    default_reason: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
        retry_after: float | None = None,
        omitted_violations: int = 0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.violations = tuple(violations)
        self.retry_after = retry_after
        # Violations found but not kept in `violations` (a request with very many).
        self.omitted_violations = omitted_violations


class InvalidArgument(RunopsError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(RunopsError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(RunopsError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(RunopsError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Unauthenticated(RunopsError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(RunopsError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(RunopsError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(RunopsError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class Aborted(RunopsError):
    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class DeadlineExceeded(RunopsError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Internal(RunopsError):
    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


def summarize_fields(fields: Sequence[str], count: int) -> str:
    """The first NAMED_FIELDS distinct field paths (each cut short) and "and N more"."""
    named = list(dict.fromkeys(_cut(f, 64) for f in fields))[:NAMED_FIELDS]
    rest = count - len(named)
    return ", ".join(named) + (f" and {rest} more" if rest > 0 else "")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def not_found(what: str, value: str, field: str, where: str = "") -> NotFound:
    """NOT_FOUND `<WHAT>_NOT_FOUND` naming `field`, e.g. ("environment", id, "environment_id")."""
    return NotFound(
        f"{what} {value} does not exist{where}",
        reason=f"{what.upper()}_NOT_FOUND",
        metadata={field: value},
        violations=[FieldViolation(field, f"no {what} has this id")],
    )


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def rich_status(err: RunopsError) -> grpc.Status:
    """The grpc.Status (code, message, google.rpc details) that carries `err` to the client,
    bounded to fit a default client's trailer limit however many violations `err` has."""
    bad_request = error_details_pb2.BadRequest()
    budget = DETAILS_BUDGET_BYTES
    for v in err.violations[:MAX_LISTED_VIOLATIONS]:
        entry = error_details_pb2.BadRequest.FieldViolation(
            field=_cut(v.field, MAX_FIELD_CHARS),
            description=_cut(v.description, MAX_DESCRIPTION_CHARS),
        )
        budget -= entry.ByteSize() + 4
        if budget < 0:
            break
        bad_request.field_violations.append(entry)
    omitted = len(err.violations) - len(bad_request.field_violations) + err.omitted_violations
    metadata = {k: _cut(v, MAX_METADATA_VALUE_CHARS) for k, v in err.metadata.items()}
    if omitted:
        metadata["omitted_violations"] = str(omitted)
    details = [
        _pack(
            error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN, metadata=metadata)
        )
    ]
    if bad_request.field_violations:
        details.append(_pack(bad_request))
    if err.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(err.retry_after * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(
        code=err.code.value[0], message=_cut(err.message, MAX_MESSAGE_CHARS), details=details
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


@dataclass(frozen=True)
class ErrorDetails:
    """What a client can read back from a failed call."""

    code: grpc.StatusCode
    message: str
    reason: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    violations: tuple[FieldViolation, ...] = ()
    retry_after: float | None = None

    @property
    def fields(self) -> list[str]:
        return [v.field for v in self.violations]


def details_of(exc: grpc.aio.AioRpcError | grpc.RpcError) -> ErrorDetails:
    """Code, message and google.rpc details of a failed call (sync or asyncio)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    message = exc.details() if hasattr(exc, "details") else str(exc)
    status = _status_from_trailers(exc)
    result = ErrorDetails(code=code, message=message or "")
    if status is None:
        return result
    reason: str | None = None
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_after: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return ErrorDetails(code, message or "", reason, metadata, tuple(violations), retry_after)


def retry_delay(exc: BaseException) -> float | None:
    """The wait a failed call's RetryInfo asks for (a `Retry`'s `delay_hint`); None for any
    other exception or a status without one."""
    if isinstance(exc, grpc.RpcError):
        return details_of(exc).retry_after
    return None


def _status_from_trailers(exc: grpc.RpcError) -> status_pb2.Status | None:
    trailers: Any = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            if status.code != code_pb2.OK:
                return status
    return None


def error_from_rpc(exc: grpc.aio.AioRpcError | grpc.RpcError) -> RunopsError:
    """A downstream call's failure as the domain error it was raised as, details intact, so a
    caller's mistake (NOT_FOUND, INVALID_ARGUMENT, ...) can be passed on rather than becoming
    INTERNAL."""
    details = details_of(exc)
    cls = next(
        (c for c in _ERROR_CLASSES if c.code == details.code),
        RunopsError,
    )
    return cls(
        details.message,
        reason=details.reason,
        metadata=details.metadata,
        violations=details.violations,
        retry_after=details.retry_after,
    )


_ERROR_CLASSES: tuple[type[RunopsError], ...] = (
    InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, Unauthenticated,
    PermissionDenied, ResourceExhausted, Unavailable, Aborted, DeadlineExceeded, Internal,
)  # fmt: skip
