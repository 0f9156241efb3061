"""Who may call what: a per-method access level checked from `authorization: Bearer <token>`.

The level is declared once, in the contract: the `(runops.common.v1.access)` method option.
`service_access` reads it from the service descriptor; a method that declares none maps to
None and the server refuses it (fail closed).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from enum import Enum
from typing import Any

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from pydantic import SecretStr

from runops.common.v1 import options_pb2
from runops.kit.context import ANONYMOUS, Caller, Principal
from runops.kit.errors import PermissionDenied, Unauthenticated


class Access(Enum):
    # No credentials needed (health, reflection).
    PUBLIC = "public"
    # Service-to-service: the internal token (or the admin token).
    INTERNAL = "internal"
    # Operators: the admin token.
    ADMIN = "admin"
    # Platform users: an API key, resolved by the service's resolver.
    API_KEY = "api_key"


ApiKeyResolver = Callable[[str], Awaitable[Any]]

_DECLARED: dict[int, Access] = {
    options_pb2.ACCESS_LEVEL_PUBLIC: Access.PUBLIC,
    options_pb2.ACCESS_LEVEL_INTERNAL: Access.INTERNAL,
    options_pb2.ACCESS_LEVEL_ADMIN: Access.ADMIN,
    options_pb2.ACCESS_LEVEL_API_KEY: Access.API_KEY,
}


class AccessDeclarationError(ValueError):
    """A service's access declarations do not match its contract (raised at start-up)."""


def resolve_service(service: ServiceDescriptor | str) -> ServiceDescriptor:
    """A service descriptor, or a full service name looked up in the default descriptor pool
    (its generated `_pb2` module must have been imported)."""
    if isinstance(service, ServiceDescriptor):
        return service
    try:
        return descriptor_pool.Default().FindServiceByName(service)
    except KeyError:
        raise AccessDeclarationError(
            f"no service {service!r} in the descriptor pool: import its _pb2 module first"
        ) from None


def declared_access(method: MethodDescriptor) -> Access | None:
    """The method's `(runops.common.v1.access)` option, or None when it declares none."""
    return _DECLARED.get(method.GetOptions().Extensions[options_pb2.access])


def service_access(
    service: ServiceDescriptor | Any, overrides: Mapping[str, Access] | None = None
) -> dict[str, Access | None]:
    """Full method path ("/pkg.Service/Method") -> level, from the contract's method options;
    `overrides` (by method name) are for contracts that cannot carry the option. A name the
    service does not have is an error, so a typo cannot leave a method at the wrong level."""
    methods = service.methods_by_name
    unknown = sorted(set(overrides or {}) - set(methods))
    if unknown:
        raise AccessDeclarationError(
            f"access overrides for {service.full_name} name methods it does not have: "
            f"{', '.join(unknown)} (its methods: {', '.join(sorted(methods))})"
        )
    return {
        f"/{service.full_name}/{name}": (overrides or {}).get(name) or declared_access(method)
        for name, method in methods.items()
    }


def bearer_token(metadata: Mapping[str, str | bytes]) -> str | None:
    value = metadata.get("authorization")
    if not isinstance(value, str):
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(token: str, secret: SecretStr | None) -> bool:
    return secret is not None and hmac.compare_digest(
        token.encode(), secret.get_secret_value().encode()
    )


class Authenticator:
    def __init__(
        self,
        *,
        admin_token: SecretStr | None,
        internal_token: SecretStr | None,
        api_key_resolver: ApiKeyResolver | None = None,
    ) -> None:
        self._admin = admin_token
        self._internal = internal_token
        self._resolve_api_key = api_key_resolver

    async def authenticate(self, access: Access, metadata: Mapping[str, str | bytes]) -> Principal:
        if access is Access.PUBLIC:
            return ANONYMOUS
        token = bearer_token(metadata)
        if access is Access.ADMIN:
            if self._admin is None:
                raise PermissionDenied(
                    "admin RPCs are disabled on this server: set RUNOPS_ADMIN_TOKEN",
                    reason="ADMIN_DISABLED",
                )
            if token is None:
                raise Unauthenticated(
                    "admin RPCs need `authorization: Bearer <admin token>`", reason="MISSING_TOKEN"
                )
            if not _matches(token, self._admin):
                raise PermissionDenied("the admin token is not valid", reason="INVALID_ADMIN_TOKEN")
            return Principal(Caller.ADMIN)
        if access is Access.INTERNAL:
            if self._internal is None:
                return Principal(Caller.INTERNAL)
            if token is None:
                raise Unauthenticated(
                    "internal RPCs need `authorization: Bearer <internal token>`",
                    reason="MISSING_TOKEN",
                )
            if _matches(token, self._internal):
                return Principal(Caller.INTERNAL)
            if _matches(token, self._admin):
                return Principal(Caller.ADMIN)
            raise PermissionDenied(
                "the internal service token is not valid", reason="INVALID_INTERNAL_TOKEN"
            )
        # API_KEY
        if self._resolve_api_key is None:
            raise PermissionDenied(
                "this server does not accept API keys", reason="API_KEYS_DISABLED"
            )
        if token is None:
            raise Unauthenticated(
                "this RPC needs `authorization: Bearer <api key>`", reason="MISSING_API_KEY"
            )
        subject = await self._resolve_api_key(token)
        return Principal(Caller.API_KEY, subject)
