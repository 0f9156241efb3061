"""How every `runops` verb fails: `error: ...` on stderr and an exit code, never a traceback.

A bad invocation (a missing or malformed file, a missing flag) is a UsageError: exit 2. A call
the service refused is reported from its status (the message, the fields it names, a hint for
an unreachable target or a rejected credential): exit 2 for INVALID_ARGUMENT, else 1.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runops.kit.errors import ErrorDetails

USAGE_EXIT = 2
FAILURE_EXIT = 1


class UsageError(Exception):
    """A bad invocation (exit 2)."""


def print_error(message: object) -> None:
    print(f"error: {message}", file=sys.stderr)


def call_failure(exc: BaseException) -> ErrorDetails | None:
    """The status of a failed call: an AioRpcError, or the domain error a kit client raised
    from one (runops.kit.clients); None for anything else."""
    import grpc

    from runops.kit.errors import details_of

    for candidate in (exc, exc.__cause__):
        if isinstance(candidate, grpc.aio.AioRpcError):
            return details_of(candidate)
    return None


def report_call_failure(
    details: ErrorDetails, *, service: str, target: str, credential: str
) -> int:
    """Prints the failure (one line, then the fields it names) and returns the exit code."""
    import grpc

    print_error(details.message or details.code.name)
    for violation in details.violations:
        print(f"  {violation.field}: {violation.description}", file=sys.stderr)
    if details.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        print(f"  (is the {service} running at {target}?)", file=sys.stderr)
    elif details.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        print(f"  (check {credential})", file=sys.stderr)
    return USAGE_EXIT if details.code == grpc.StatusCode.INVALID_ARGUMENT else FAILURE_EXIT
