"""Every method of every service's contract under hostile input, generated from the descriptors
(`runops.registry` names the services, their descriptors the methods and fields), so a new RPC
is swept without anyone listing it.

Per method, against the running suite: no token, a wrong token, a token of the wrong role;
malformed protobuf bytes and invalid UTF-8 in a string field (raw bytes, no client-side
serializer); NUL and over-long values in every top-level string field and one nested; 10,000
entries in a repeated field; a message near the size limit; ids of another environment. Each
answer is the precise status (with field details where the input was at fault), never INTERNAL
or UNKNOWN; afterwards every process still answers SERVING and logged no unhandled error.
"""

from __future__ import annotations

import asyncio
import importlib
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runops import registry
from runops.ingest.v1 import ingest_pb2 as ing
from runops.kit.auth import Access, declared_access, resolve_service
from runops.kit.errors import ErrorDetails, details_of
from runops.kit.request_checks import max_length
from runops.kit.settings import ServerSettings
from runops.runstore.v1 import runstore_pb2 as rs
from tests.e2e.suite import Clients, Endpoints, Tenant, new_tenant

Code = grpc.StatusCode
# Answers that mean the server did not handle the input: never acceptable.
UNHANDLED = {Code.INTERNAL, Code.UNKNOWN, Code.DATA_LOSS, Code.UNIMPLEMENTED}
# Statuses a request may get for bad input that is not per se malformed (too many entries, a
# huge but well-formed message): a definite answer, OK included.
DEFINITE = {
    Code.OK,
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.FAILED_PRECONDITION,
    Code.ALREADY_EXISTS,
    Code.RESOURCE_EXHAUSTED,
}
# A method that checks an API key it is given answers about that key (UNAUTHENTICATED).
KEY_FIELD = "api_key"
REPEATED_ENTRIES = 10_000
# Fields that name a run or batch: the "another environment" case puts the other tenant's here.
FOREIGN_ID_FIELDS = ("run_id", "batch_id")
# What fills a field the foreign-id request left out (a task identifier, a tag, a key alike).
FILLER = "e2e/hostile"
FILL_ATTEMPTS = 4
# A field number no request uses: the near-limit message's padding travels as an unknown field.
PADDING_FIELD = 10_000
MAX_MESSAGE_BYTES = int(ServerSettings.model_fields["max_message_bytes"].default)
CALL_TIMEOUT = 20.0
# A server stream that sent nothing this long after a valid request is open (OK). Every stream
# swept today answers at once (its first message or its error), so this costs nothing; it is long
# so that a loaded machine's late error is never mistaken for an open stream.
STREAM_QUIET_SECONDS = 10.0
# Methods swept at once (each sends its cases in turn).
CONCURRENCY = 8
WRONG_TOKEN = "not-a-token-of-this-suite"
LOG_ALARMS = ("Traceback", "unhandled error")


# -- the contracts ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    service: registry.Service
    descriptor: MethodDescriptor
    target: str

    @property
    def path(self) -> str:
        return f"/{self.service.contract}/{self.descriptor.name}"

    @property
    def access(self) -> Access:
        declared = declared_access(self.descriptor)
        assert declared is not None, f"{self.path} declares no access level"
        return declared

    def new_request(self) -> Message:
        message: Message = GetMessageClass(self.descriptor.input_type)()
        return message


def every_method(endpoints: Endpoints) -> list[Method]:
    methods = []
    for service in registry.available():
        importlib.import_module(f"{service.proto_package}.{service.name}_pb2")
        target = getattr(endpoints, service.name)
        for descriptor in resolve_service(service.contract).methods:
            methods.append(Method(service, descriptor, target))
    return methods


def _message_type(fd: FieldDescriptor) -> Descriptor | None:
    """The field's message type (None for a scalar or a map)."""
    if fd.type != FieldDescriptor.TYPE_MESSAGE or fd.message_type is None:
        return None
    return None if fd.message_type.GetOptions().map_entry else fd.message_type


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.type == FieldDescriptor.TYPE_MESSAGE and _message_type(fd) is None


def _path_to(
    descriptor: Descriptor, wanted: Callable[[FieldDescriptor], bool], depth: int = 4
) -> list[FieldDescriptor] | None:
    """The first field (depth first, maps left out) that `wanted` picks, as its path."""
    for fd in descriptor.fields:
        if _is_map(fd):
            continue
        if wanted(fd):
            return [fd]
    if depth > 1:
        for fd in descriptor.fields:
            if (inner := _message_type(fd)) is not None:
                below = _path_to(inner, wanted, depth - 1)
                if below is not None:
                    return [fd, *below]
    return None


def _is_string(fd: FieldDescriptor) -> bool:
    return fd.type == FieldDescriptor.TYPE_STRING


def _nested_string(descriptor: Descriptor) -> list[FieldDescriptor] | None:
    """A string field below the top level (inside the first message field that has one)."""
    for fd in descriptor.fields:
        if (inner := _message_type(fd)) is not None:
            below = _path_to(inner, _is_string, 3)
            if below is not None:
                return [fd, *below]
    return None


def _parent(message: Message, path: list[FieldDescriptor]) -> tuple[Message, str]:
    """The message holding the path's last field (repeated parents get one entry), and the
    path as the kit's violations render it."""
    rendered = ""
    for fd in path[:-1]:
        if fd.is_repeated:
            message = getattr(message, fd.name).add()
            rendered += f"{fd.name}[0]."
        else:
            message = getattr(message, fd.name)
            rendered += f"{fd.name}."
    return message, rendered + path[-1].name


def _set_string(message: Message, path: list[FieldDescriptor], value: str) -> str:
    holder, rendered = _parent(message, path)
    last = path[-1]
    if last.is_repeated:
        getattr(holder, last.name).append(value)
        return f"{rendered}[0]"
    setattr(holder, last.name, value)
    return rendered


def strings_filled(
    method: Method, value: Callable[[FieldDescriptor], str]
) -> tuple[bytes, set[str]]:
    """Every top-level string field and one nested set to value(field); (bytes, the field
    paths the answer must name)."""
    message = method.new_request()
    descriptor = method.descriptor.input_type
    expected: dict[str, list[FieldDescriptor]] = {}
    for fd in descriptor.fields:
        if _is_string(fd):
            expected[_set_string(message, [fd], value(fd))] = [fd]
    nested = _nested_string(descriptor)
    if nested is not None:
        expected[_set_string(message, nested, value(nested[-1]))] = nested
    # A oneof keeps only its last member set.
    present = {fd.name for fd, _ in message.ListFields()}
    kept = {path for path, fields in expected.items() if fields[0].name in present}
    return message.SerializeToString(), kept


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def invalid_utf8(method: Method) -> bytes | None:
    """A string field (nested if need be) holding bytes that are not UTF-8."""
    path = _path_to(method.descriptor.input_type, _is_string)
    if path is None:
        return None
    data = b"\xc3\x28"
    for fd in reversed(path):
        data = _length_delimited(fd.number, data)
    return data


def many_entries(method: Method) -> bytes | None:
    """REPEATED_ENTRIES entries in the first repeated field (nested if need be)."""
    path = _path_to(method.descriptor.input_type, lambda fd: fd.is_repeated)
    if path is None:
        return None
    message = method.new_request()
    holder, _ = _parent(message, path)
    entries = getattr(holder, path[-1].name)
    for i in range(REPEATED_ENTRIES):
        if path[-1].type == FieldDescriptor.TYPE_MESSAGE:
            entries.add()
        elif _is_string(path[-1]):
            entries.append(f"x{i}")
        elif path[-1].type == FieldDescriptor.TYPE_BOOL:
            entries.append(False)
        else:
            entries.append(0)
    return message.SerializeToString()


def padded(size: int) -> bytes:
    """An empty request padded (an unknown field) to `size` bytes."""
    overhead = len(_length_delimited(PADDING_FIELD, b"")) + 4
    return _length_delimited(PADDING_FIELD, b"\0" * (size - overhead))


# -- calls -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    code: Code
    details: ErrorDetails | None
    # The response's bytes, when one answer came (None for a server stream).
    body: bytes | None = None


def _raw(data: bytes) -> bytes:
    return data


async def call(channel: grpc.aio.Channel, method: Method, data: bytes, token: str | None) -> Answer:
    """One hostile message on the method (whatever its kind), as raw bytes."""
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    kind = method.descriptor
    body: bytes | None = None
    try:
        if kind.client_streaming:

            async def one() -> AsyncIterator[bytes]:
                yield data

            if kind.server_streaming:
                raise AssertionError(f"{method.path}: bidirectional streams are not swept yet")
            body = await channel.stream_unary(method.path, _raw, _raw)(
                one(), metadata=metadata, timeout=CALL_TIMEOUT
            )
        elif kind.server_streaming:
            stream = channel.unary_stream(method.path, _raw, _raw)(
                data, metadata=metadata, timeout=CALL_TIMEOUT
            )
            try:
                await asyncio.wait_for(stream.read(), STREAM_QUIET_SECONDS)
            except TimeoutError:
                pass  # open and quiet: the request was taken
            finally:
                stream.cancel()
            code = await stream.code()
            if code not in (Code.OK, Code.CANCELLED):
                raise grpc.aio.AioRpcError(
                    code,
                    await stream.initial_metadata(),
                    await stream.trailing_metadata(),
                    await stream.details(),
                )
        else:
            body = await channel.unary_unary(method.path, _raw, _raw)(
                data, metadata=metadata, timeout=CALL_TIMEOUT
            )
    except grpc.aio.AioRpcError as exc:
        return Answer(exc.code(), details_of(exc))
    return Answer(Code.OK, None, body)


def _open(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1),
            ("grpc.lb_policy_name", "round_robin"),
        ],
    )


# -- the cases -------------------------------------------------------------------------------
@dataclass
class World:
    """Two tenants; the other one owns a run and a batch whose ids the first one sends."""

    endpoints: Endpoints
    mine: Tenant
    other: Tenant
    other_run: str
    other_batch: str

    def token(self, access: Access) -> str | None:
        return {
            Access.PUBLIC: None,
            Access.INTERNAL: self.endpoints.internal_token,
            Access.ADMIN: self.endpoints.admin_token,
            Access.API_KEY: self.mine.api_key,
        }[access]

    def wrong_roles(self, access: Access) -> list[tuple[str, str, Code]]:
        """(case, a token of another role, what it must get). The admin token on an internal
        method is allowed (operators may call anything internal)."""
        api_key = ("an API key", self.mine.api_key, Code.PERMISSION_DENIED)
        internal = ("the internal token", self.endpoints.internal_token, Code.PERMISSION_DENIED)
        return {
            Access.PUBLIC: [],
            Access.INTERNAL: [api_key],
            Access.ADMIN: [api_key, internal],
            Access.API_KEY: [
                ("the internal token", self.endpoints.internal_token, Code.UNAUTHENTICATED),
                ("the admin token", self.endpoints.admin_token, Code.UNAUTHENTICATED),
            ],
        }[access]


@dataclass
class Sweep:
    world: World
    channels: dict[str, grpc.aio.Channel]
    failures: list[str]
    cases: int = 0

    async def send(self, method: Method, data: bytes, token: str | None) -> Answer:
        self.cases += 1
        return await call(self.channels[method.target], method, data, token)

    def fail(self, method: Method, case: str, answer: Answer, wanted: str) -> None:
        got = answer.code.name
        if answer.details is not None:
            got += f" {answer.details.reason or ''} {answer.details.message[:160]!r}"
            got += f" fields={answer.details.fields[:5]}"
        self.failures.append(f"{method.path} [{case}]: got {got}; wanted {wanted}")

    async def expect(
        self,
        method: Method,
        case: str,
        data: bytes,
        token: str | None,
        wanted: Code,
        *,
        reason: str | None = None,
        fields: set[str] | None = None,
    ) -> None:
        answer = await self.send(method, data, token)
        named = set(answer.details.fields) if answer.details else set()
        got_reason = answer.details.reason if answer.details else None
        if (
            answer.code != wanted
            or (reason is not None and got_reason != reason)
            or (fields is not None and not fields <= named)
        ):
            self.fail(method, case, answer, f"{wanted.name} {reason or ''} fields={fields}")

    async def definite(self, method: Method, case: str, data: bytes) -> Answer:
        """A definite answer; a refusal of the input names its field(s) or a reason."""
        allowed = set(DEFINITE)
        if KEY_FIELD in method.descriptor.input_type.fields_by_name:
            allowed.add(Code.UNAUTHENTICATED)
        answer = await self.send(method, data, self.world.token(method.access))
        details = answer.details
        if answer.code not in allowed or (
            answer.code == Code.INVALID_ARGUMENT
            and details is not None
            and not (details.fields or details.reason)
        ):
            self.fail(method, case, answer, f"one of {sorted(c.name for c in allowed)}")
        return answer

    async def method(self, method: Method) -> None:
        world, access = self.world, method.access
        empty = b""
        if access is not Access.PUBLIC:
            await self.expect(method, "no token", empty, None, Code.UNAUTHENTICATED)
            wrong = Code.UNAUTHENTICATED if access is Access.API_KEY else Code.PERMISSION_DENIED
            await self.expect(method, "wrong token", empty, WRONG_TOKEN, wrong)
            for role, other_token, code in world.wrong_roles(access):
                await self.expect(method, f"{role} instead", empty, other_token, code)
        token = world.token(access)
        for name, data in (("truncated bytes", b"\x0a\xff\x01"), ("bad tag", b"\xff\xff\xff\xff")):
            await self.expect(
                method, name, data, token, Code.INVALID_ARGUMENT, reason="MALFORMED_REQUEST"
            )
        bad_utf8 = invalid_utf8(method)
        if bad_utf8 is not None:
            await self.expect(
                method,
                "invalid UTF-8",
                bad_utf8,
                token,
                Code.INVALID_ARGUMENT,
                reason="MALFORMED_REQUEST",
            )
        for name, value in (
            ("NUL in strings", lambda fd: "a\x00b"),
            ("over-long strings", lambda fd: "x" * (max_length(fd) + 1)),
        ):
            data, paths = strings_filled(method, value)
            if paths:
                await self.expect(method, name, data, token, Code.INVALID_ARGUMENT, fields=paths)
        many = many_entries(method)
        if many is not None:
            await self.definite(method, f"{REPEATED_ENTRIES:,} repeated entries", many)
        await self.definite(method, "near the size limit", padded(MAX_MESSAGE_BYTES - 1024))
        await self.foreign_ids(method)

    async def foreign_ids(self, method: Method) -> None:
        """The other tenant's run and batch ids, sent as this tenant's (the API key's
        environment, or environment_id): NOT_FOUND (ALREADY_EXISTS for a create naming the
        id). A refusal of another field gets that field filled and the request sent again, so
        a missing field does not hide the answer about the id."""
        fields = method.descriptor.input_type.fields_by_name
        named = [name for name in FOREIGN_ID_FIELDS if name in fields]
        if not named:
            return
        message = method.new_request()
        world = self.world
        ids = {
            "environment_id": world.mine.environment_id,
            "organization_id": world.mine.organization_id,
            "project_id": world.mine.project_id,
            "run_id": world.other_run,
            "batch_id": world.other_batch,
        }
        for name, value in ids.items():
            if name in fields:
                setattr(message, name, value)
        for _attempt in range(FILL_ATTEMPTS):
            data = message.SerializeToString()
            answer = await self.send(method, data, world.token(method.access))
            others = set(answer.details.fields if answer.details else ()) - set(ids)
            if answer.code != Code.INVALID_ARGUMENT or not others or not fill(message, others):
                break
        # An empty OK (e.g. `published: false`) did nothing and revealed nothing.
        if answer.code not in (Code.NOT_FOUND, Code.ALREADY_EXISTS) and answer.body != b"":
            self.fail(method, "ids of another environment", answer, "NOT_FOUND or an empty OK")


_SEGMENT = re.compile(r"(\w+)(?:\[(\d+)\])?")
_INTEGERS = {
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
}  # fmt: skip


def fill(message: Message, paths: set[str]) -> bool:
    """Plausible values at the field paths a refusal named (`items[0].run.task`; a oneof's
    name: its first member); False when none could be filled."""
    return any([_fill_one(message, path) for path in sorted(paths)])


def _fill_one(message: Any, path: str) -> bool:
    segments = [_SEGMENT.fullmatch(part) for part in path.split(".")]
    for position, segment in enumerate(segments):
        if segment is None:
            return False
        name, index = segment.group(1), int(segment.group(2) or 0)
        descriptor = message.DESCRIPTOR
        oneof = descriptor.oneofs_by_name.get(name)
        fd = oneof.fields[0] if oneof is not None else descriptor.fields_by_name.get(name)
        if fd is None or _is_map(fd):
            return False
        last = position == len(segments) - 1
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if fd.is_repeated:
                entries = getattr(message, fd.name)
                while len(entries) <= index:
                    entries.add()
                message = entries[index]
            else:
                message = getattr(message, fd.name)
            if last:
                if message.DESCRIPTOR.full_name == "google.protobuf.Timestamp":
                    message.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
                else:
                    message.SetInParent()
            continue
        if not last:
            return False
        value: object = FILLER if _is_string(fd) else 1 if fd.type in _INTEGERS else None
        if value is None:
            return False
        if fd.is_repeated:
            getattr(message, fd.name).append(value)
        else:
            setattr(message, fd.name, value)
    return True


# -- the test --------------------------------------------------------------------------------
async def _world(clients: Clients) -> World:
    mine, other = await new_tenant(clients.admin), await new_tenant(clients.admin)
    run = await clients.runstore.CreateRun(
        rs.CreateRunRequest(
            run=rs.RunInput(
                environment_id=other.environment_id,
                organization_id=other.organization_id,
                project_id=other.project_id,
                task_identifier="e2e/hostile",
                payload=b"{}",
                payload_type="application/json",
            )
        )
    )
    batch = await clients.ingest(other.api_key).CreateBatch(ing.CreateBatchRequest(run_count=1))
    return World(clients.endpoints, mine, other, run.run.friendly_id, batch.batch.friendly_id)


def _log_sizes(logs: tuple[Path, ...]) -> dict[Path, int]:
    return {path: path.stat().st_size if path.exists() else 0 for path in logs}


def _alarms_since(sizes: dict[Path, int]) -> list[str]:
    """What the logs gained: each alarm with the line before it and the traceback after it. A
    traceback logged through grpc's or asyncio's own loggers counts too: the one seen so far was
    ours (the kit's call scope closed by asyncio's finalizer in another Context)."""
    alarms: list[str] = []
    for path, size in sizes.items():
        with path.open("rb") as log:
            log.seek(size)
            text = log.read().decode(errors="replace")
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if any(alarm in line for alarm in LOG_ALARMS):
                block = "\n    ".join(x[:300] for x in lines[max(i - 1, 0) : i + 14])
                alarms.append(f"{path.name}: {block}")
    return alarms


async def _serving(target: str) -> list[str]:
    """Each server behind `target` (host:port, or ipv4:a,b) answers SERVING."""
    addresses = target.removeprefix("ipv4:").split(",")
    down = []
    for address in addresses:
        async with grpc.aio.insecure_channel(address) as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                down.append(f"{address}: {reply.status}")
    return down


async def test_every_rpc_answers_hostile_input_precisely(clients: Clients) -> None:
    endpoints = clients.endpoints
    methods = every_method(endpoints)
    assert {m.service.name for m in methods} == {s.name for s in registry.available()}
    world = await _world(clients)
    sizes = _log_sizes(endpoints.logs)
    channels = {target: _open(target) for target in {m.target for m in methods}}
    sweep = Sweep(world, channels, [])
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(method: Method) -> None:
        async with limit:
            await sweep.method(method)

    began = time.monotonic()
    try:
        await asyncio.gather(*(one(m) for m in methods))
        # Above the limit: grpc refuses it before any handler (one method per service).
        for service in {m.service.name: m for m in methods}.values():
            await sweep.expect(
                service,
                "above the size limit",
                padded(MAX_MESSAGE_BYTES + 1024),
                world.token(service.access),
                Code.RESOURCE_EXHAUSTED,
            )
    finally:
        await asyncio.gather(*(c.close() for c in channels.values()))
    seconds = time.monotonic() - began
    print(
        f"hostile sweep: {len(methods)} methods, {sweep.cases} cases in {seconds:.1f}s, "
        f"{len(sizes)} logs read"
    )
    assert not sweep.failures, f"{len(sweep.failures)} wrong answers:\n" + "\n".join(sweep.failures)
    down = [line for target in channels for line in await _serving(target)]
    assert not down, f"not serving after the sweep: {down}"
    alarms = _alarms_since(sizes)
    assert not alarms, "unhandled errors logged during the sweep:\n" + "\n".join(alarms)
