"""Access is declared once, in the contract, and fails closed."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from runops.kit.auth import Access, AccessDeclarationError
from runops.kit.errors import details_of
from runops.kit.server import ServiceApp
from runops.testing.v1 import testing_pb2 as t
from runops.testing.v1 import testing_pb2_grpc as t_grpc
from tests.kit.app import SERVICE, TestingServicer
from tests.kit.harness import ADMIN, INTERNAL, METHOD, auth, settings, stub


def _servicer(app: ServiceApp) -> TestingServicer:
    return TestingServicer(INTERNAL, app.shutting_down)


async def test_a_method_without_an_access_level_is_refused(channel: grpc.aio.Channel) -> None:
    for metadata in ((), auth(INTERNAL), auth(ADMIN)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(channel).Undeclared(t.UndeclaredRequest(), metadata=metadata)
        details = details_of(info.value)
        assert details.code == grpc.StatusCode.PERMISSION_DENIED
        assert details.reason == "ACCESS_NOT_DECLARED"
        assert "Undeclared" in details.message


async def test_an_unknown_method_is_unimplemented(channel: grpc.aio.Channel) -> None:
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"{METHOD}Nope")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"", metadata=auth(ADMIN))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_handler_registered_past_add_service_is_refused() -> None:
    """A register function that adds more than its service declares: those methods have no
    declared level, so they are refused rather than served as PUBLIC."""
    app = ServiceApp("kit-app", settings())

    async def sneaky(request: bytes, context: Any) -> bytes:
        raise AssertionError("must not run")

    def register(servicer: Any, server: grpc.aio.Server) -> None:
        t_grpc.add_TestingServiceServicer_to_server(servicer, server)
        handler = grpc.method_handlers_generic_handler(
            "other.v1.Other", {"Do": grpc.unary_unary_rpc_method_handler(sneaky)}
        )
        server.add_generic_rpc_handlers((handler,))

    app.add_service(SERVICE, register, _servicer(app))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.target) as ch:
            other: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(
                "/other.v1.Other/Do"
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await other(b"", metadata=auth(ADMIN))
            assert details_of(info.value).reason == "ACCESS_NOT_DECLARED"
            # The declared methods are served as their contract says.
            reply = await stub(ch).Behave(t.BehaveRequest(), metadata=auth(INTERNAL))
            assert reply.echo.caller == "internal"
    finally:
        await app.stop(grace=1)


def test_a_misspelt_override_stops_start_up() -> None:
    app = ServiceApp("kit-app", settings())
    with pytest.raises(AccessDeclarationError) as info:
        app.add_service(
            SERVICE,
            t_grpc.add_TestingServiceServicer_to_server,
            _servicer(app),
            method_access={"AdminOnyl": Access.ADMIN},
        )
    message = str(info.value)
    assert "AdminOnyl" in message
    assert SERVICE.full_name in message
    assert "AdminOnly" in message  # the names it does have, to spot the typo


def test_an_unknown_service_name_stops_start_up() -> None:
    app = ServiceApp("kit-app", settings())
    with pytest.raises(AccessDeclarationError, match=re.escape("runops.testing.v1.TestingSrevice")):
        app.add_service(
            "runops.testing.v1.TestingSrevice",
            t_grpc.add_TestingServiceServicer_to_server,
            _servicer(app),
        )


@pytest.fixture
async def overridden() -> AsyncIterator[grpc.aio.Channel]:
    """The service added by full name, with an explicit override for the undeclared method."""
    app = ServiceApp("kit-app", settings())
    app.add_service(
        SERVICE.full_name,
        t_grpc.add_TestingServiceServicer_to_server,
        _servicer(app),
        method_access={"Open": Access.ADMIN},
    )
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.target) as ch:
            yield ch
    finally:
        await app.stop(grace=1)


async def test_an_override_replaces_the_declared_level(overridden: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(overridden).Open(t.OpenRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await stub(overridden).Open(t.OpenRequest(), metadata=auth(ADMIN))).echo.caller == (
        "admin"
    )


async def test_public_needs_nothing(channel: grpc.aio.Channel) -> None:
    reply = await stub(channel).Open(t.OpenRequest(probe=t.Probe(text="hi")))
    assert (reply.echo.text, reply.echo.caller) == ("hi", "anonymous")


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        (auth("not-a-key"), grpc.StatusCode.UNAUTHENTICATED),
    ],
)
async def test_api_key_rpc_needs_a_valid_key(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(channel).WithApiKey(t.WithApiKeyRequest(), metadata=metadata)
    assert info.value.code() == code
    reply = await stub(channel).WithApiKey(t.WithApiKeyRequest(), metadata=auth("key-env_1"))
    assert reply.echo.caller == "api_key"


async def test_an_api_key_rpc_refuses_a_server_without_a_resolver() -> None:
    app = ServiceApp("kit-app", settings())  # no api_key_resolver
    app.add_service(SERVICE, t_grpc.add_TestingServiceServicer_to_server, _servicer(app))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.target) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub(ch).WithApiKey(t.WithApiKeyRequest(), metadata=auth("key-env_1"))
            assert details_of(info.value).reason == "API_KEYS_DISABLED"
    finally:
        await app.stop(grace=1)
