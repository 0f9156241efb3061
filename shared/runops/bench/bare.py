"""The bare grpc.aio servicer the routed `GetRun` is measured against (spec §7: routed >= 0.8 of
it, so the routing seam costs at most 25%): one unary method under the run store's own name
(`RunStoreClient` calls it unchanged) running the service's primary-key read on a pool of the
same size and answering with the same `Run`, with no kit interceptor, no routing, no checks.
It runs in the bench's own process (a grpc.aio server on its event loop)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc

from runops.kit.ids import body_of
from runops.runstore.v1 import runstore_pb2 as rs

SERVICE = rs.DESCRIPTOR.services_by_name["RunStoreService"].full_name


@contextlib.asynccontextmanager
async def get_run_server(dsn: str, pool_size: int) -> AsyncIterator[str]:
    """Serve the bare `GetRun` on 127.0.0.1 (reading `dsn`) while inside: its target."""
    from services.runstore.records import run_from_record
    from services.runstore.sql import SELECT_RUN

    pool = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size)

    async def get_run(request: rs.GetRunRequest, context: Any) -> rs.GetRunResponse:
        record = await pool.fetchrow(SELECT_RUN, body_of(request.run_id), request.environment_id)
        if record is not None:
            return rs.GetRunResponse(run=run_from_record(record))
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such run")
        raise AssertionError("abort raises")

    handler = grpc.unary_unary_rpc_method_handler(
        get_run,
        request_deserializer=rs.GetRunRequest.FromString,
        response_serializer=rs.GetRunResponse.SerializeToString,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"GetRun": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=1)
        await pool.close()
