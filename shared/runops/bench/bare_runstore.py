"""The floor of routed `GetRun` (spec §7): a bare grpc.aio servicer doing the same primary-key
read, with nothing of the kit around it (no interceptor: no auth, checks, log context, metrics or
error mapping; no routing, no replica guard; asyncpg's default pool).

    python -m runops.bench.bare_runstore --dsn DSN --port PORT [--pool N]

It answers `GetRun` only, with the service's own statement (`sql.SELECT_RUN`) and record → proto
mapping (`records.run_from_record`), so the gap to the run store is the seam alone. It prints
`serving` on stdout once it listens and serves until stdin closes (`BareRunStore` does both).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import asyncpg
import grpc

from runops.runstore.v1 import runstore_pb2 as rs

MODULE = "runops.bench.bare_runstore"
SERVICE = "runops.runstore.v1.RunStoreService"


def _get_run(pool: asyncpg.Pool) -> Any:
    """The GetRun behaviour, registered as the generated code registers the servicer's."""
    from services.runstore.records import run_from_record
    from services.runstore.sql import SELECT_RUN

    async def get_run(
        request: rs.GetRunRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rs.GetRunResponse:
        body = request.run_id.removeprefix("run_")
        row = await pool.fetchrow(SELECT_RUN, body, request.environment_id)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such run")
        return rs.GetRunResponse(run=run_from_record(row))

    return grpc.unary_unary_rpc_method_handler(
        get_run,
        request_deserializer=rs.GetRunRequest.FromString,
        response_serializer=rs.GetRunResponse.SerializeToString,
    )


async def _serve(dsn: str, port: int, pool_size: int) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size)
    server = grpc.aio.server()
    handlers = {"GetRun": _get_run(pool)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("serving", flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the bench closes our stdin
    await server.stop(0)
    await pool.close()


class BareRunStore:
    """The bare servicer as a process of its own, while the block runs (`pid` for CPU)."""

    def __init__(self, dsn: str, port: int, pool_size: int) -> None:
        self.target = f"127.0.0.1:{port}"
        self._args = ["--dsn", dsn, "--port", str(port), "--pool", str(pool_size)]
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def __aenter__(self) -> BareRunStore:
        from runops.localstack.services import python_path

        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", MODULE, *self._args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": python_path()},
        )  # fmt: skip
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), 60)
        if line.strip() != b"serving":
            await self.__aexit__()
            raise RuntimeError(f"{MODULE} did not start (said {line!r})")
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._proc is None:
            return
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), 10)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pool", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(_serve(args.dsn, args.port, args.pool))


if __name__ == "__main__":
    main()
