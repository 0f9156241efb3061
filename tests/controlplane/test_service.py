"""ControlPlaneService against real Postgres (writer + streaming replica): keys, admin auth,
validation, environments, workers, flags."""

from __future__ import annotations

import hashlib
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runops.common.v1 import common_pb2
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.kit.channels import create_channel
from runops.kit.errors import details_of
from runops.localstack import LocalStack
from runops.localstack.ports import free_port
from runops.localstack.settings import INTERNAL_TOKEN
from services.controlplane.app import ControlPlane
from tests.controlplane.harness import (
    Seeded,
    Stub,
    seed,
    start_control_plane,
    stub,
)
from tests.harness import expect_error

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRODUCTION = common_pb2.ENVIRONMENT_TYPE_PRODUCTION


async def authenticate(internal: Stub, key: str) -> cp.Environment:
    reply = await internal.AuthenticateApiKey(cp.AuthenticateApiKeyRequest(api_key=key))
    return reply.environment


# -- API keys ------------------------------------------------------------------------------


async def test_a_created_key_resolves_to_its_environment(internal: Stub, seeded: Seeded) -> None:
    env = await authenticate(internal, seeded.api_key)
    assert env == seeded.environment
    assert env.organization.id == seeded.org_id
    assert env.project.id == seeded.project.id
    assert seeded.api_key.startswith("rk_dev_")
    assert seeded.api_key.startswith(env.api_key_prefix)
    assert len(env.api_key_prefix) < len(seeded.api_key) - 40


async def test_keys_are_stored_only_as_hashes(
    seeded: Seeded, controlplane_writer: asyncpg.Connection
) -> None:
    rows = await controlplane_writer.fetch(
        "SELECT k.* FROM api_keys k WHERE environment_id = $1", seeded.env_id
    )
    assert len(rows) == 1
    assert bytes(rows[0]["key_hash"]) == hashlib.sha256(seeded.api_key.encode()).digest()
    assert all(seeded.api_key not in str(value) for value in rows[0].values())


async def test_every_bad_key_gets_the_same_unauthenticated(
    internal: Stub, admin: Stub, seeded: Seeded
) -> None:
    rotated = seeded.api_key
    await admin.RotateApiKey(cp.RotateApiKeyRequest(environment_id=seeded.env_id))
    bad_keys = {
        "wrong": "rk_dev_" + "0" * 48,
        "rotated": rotated,
        "malformed": "not a key",
        "empty": "",
        "oversized": "rk_dev_" + "a" * 4000,
        "unicode": "rk_dev_ключ",
        "truncated": seeded.api_key[:-1],
    }
    answers = set()
    for key in bad_keys.values():
        exc = await expect_error(
            internal.AuthenticateApiKey(cp.AuthenticateApiKeyRequest(api_key=key)), UNAUTHENTICATED
        )
        details = details_of(exc)
        answers.add((details.message, details.reason, tuple(details.fields)))
    assert answers == {("the API key is not valid", "INVALID_API_KEY", ())}
    # Past the kit's cap on any string field the key is refused as malformed, before any
    # lookup: that answer depends on the length alone, never on which keys exist.
    exc = await expect_error(
        internal.AuthenticateApiKey(cp.AuthenticateApiKeyRequest(api_key="rk_dev_" + "a" * 5000)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details_of(exc).fields == ["api_key"]


async def test_rotation_invalidates_the_old_key_at_once(
    internal: Stub, admin: Stub, seeded: Seeded
) -> None:
    await authenticate(internal, seeded.api_key)  # cached
    rotated = await admin.RotateApiKey(cp.RotateApiKeyRequest(environment_id=seeded.env_id))
    assert rotated.api_key != seeded.api_key
    assert rotated.environment.api_key_prefix != seeded.environment.api_key_prefix
    await expect_error(
        internal.AuthenticateApiKey(cp.AuthenticateApiKeyRequest(api_key=seeded.api_key)),
        UNAUTHENTICATED,
    )
    assert (await authenticate(internal, rotated.api_key)).id == seeded.env_id


# -- who may call what ---------------------------------------------------------------------

ADMIN_CALLS: list[tuple[str, Any]] = [
    ("CreateOrganization", cp.CreateOrganizationRequest(slug="x", title="x")),
    ("CreateProject", cp.CreateProjectRequest()),
    ("CreateEnvironment", cp.CreateEnvironmentRequest()),
    ("RotateApiKey", cp.RotateApiKeyRequest()),
    ("PauseEnvironment", cp.PauseEnvironmentRequest()),
    ("ResumeEnvironment", cp.ResumeEnvironmentRequest()),
    ("SetOrganizationFlags", cp.SetOrganizationFlagsRequest()),
    ("RegisterWorker", cp.RegisterWorkerRequest()),
    ("PromoteWorker", cp.PromoteWorkerRequest()),
]


@pytest.mark.parametrize(
    ("method", "request_message"), ADMIN_CALLS, ids=[m for m, _ in ADMIN_CALLS]
)
async def test_admin_rpcs_need_the_admin_token(
    control_plane: ControlPlane, method: str, request_message: Any
) -> None:
    target = control_plane.app.target
    for token, code in (
        (None, UNAUTHENTICATED),
        (INTERNAL_TOKEN, grpc.StatusCode.PERMISSION_DENIED),
        ("guess", grpc.StatusCode.PERMISSION_DENIED),
    ):
        await expect_error(getattr(stub(target, token), method)(request_message), code)


async def test_resolve_rpcs_need_the_internal_token(
    control_plane: ControlPlane, seeded: Seeded
) -> None:
    anonymous = stub(control_plane.app.target, None)
    await expect_error(
        anonymous.GetEnvironment(cp.GetEnvironmentRequest(environment_id=seeded.env_id)),
        UNAUTHENTICATED,
    )
    await expect_error(
        stub(control_plane.app.target, "guess").GetEnvironment(
            cp.GetEnvironmentRequest(environment_id=seeded.env_id)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )


# -- validation ----------------------------------------------------------------------------

LONG = "x" * 300
BAD_REQUESTS: list[tuple[str, Any, set[str]]] = [
    ("GetEnvironment", cp.GetEnvironmentRequest(), {"environment_id"}),
    ("GetEnvironment", cp.GetEnvironmentRequest(environment_id="proj_abc"), {"environment_id"}),
    ("GetEnvironment", cp.GetEnvironmentRequest(environment_id="env_" + LONG), {"environment_id"}),
    ("BatchGetEnvironments", cp.BatchGetEnvironmentsRequest(), {"environment_ids"}),
    ("BatchGetEnvironments", cp.BatchGetEnvironmentsRequest(environment_ids=["env_a", ""]), {"environment_ids[1]"}),
    ("BatchGetEnvironments", cp.BatchGetEnvironmentsRequest(environment_ids=["env_a"] * 1001), {"environment_ids"}),
    ("ResolveWorkerVersion", cp.ResolveWorkerVersionRequest(worker=LONG, task_identifiers=["ok", "bad task"]),
     {"environment_id", "worker", "task_identifiers[1]"}),
    ("GetOrganizationFlags", cp.GetOrganizationFlagsRequest(organization_id="env_x"), {"organization_id"}),
    ("WatchInvalidations", cp.WatchInvalidationsRequest(organization_id="nope"), {"organization_id"}),
    ("CreateOrganization", cp.CreateOrganizationRequest(), {"slug", "title"}),
    ("CreateOrganization", cp.CreateOrganizationRequest(slug="Bad Slug", title=LONG), {"slug", "title"}),
    ("CreateProject", cp.CreateProjectRequest(organization_id="org_x", slug="-x", name="n"), {"slug"}),
    ("CreateEnvironment", cp.CreateEnvironmentRequest(project_id="proj_x", slug="prod"), {"type"}),
    ("CreateEnvironment", cp.CreateEnvironmentRequest(project_id="proj_x", slug="prod", type=99), {"type"}),  # type: ignore[arg-type]
    ("RotateApiKey", cp.RotateApiKeyRequest(), {"environment_id"}),
    ("PauseEnvironment", cp.PauseEnvironmentRequest(environment_id="x"), {"environment_id"}),
    ("ResumeEnvironment", cp.ResumeEnvironmentRequest(), {"environment_id"}),
    ("SetOrganizationFlags",
     cp.SetOrganizationFlagsRequest(organization_id="org_x", set_extra={"1bad": "v", "ok": "x" * 2000}, remove_extra=["ok"]),
     {"set_extra['1bad']", "set_extra['ok']", "remove_extra[0]"}),
    ("RegisterWorker",
     cp.RegisterWorkerRequest(environment_id="env_x", tasks=[
         cp.TaskDefinition(task_identifier="a", max_attempts=101, machine_preset="huge"),
         cp.TaskDefinition(task_identifier="a", default_ttl=duration_pb2.Duration(seconds=-1)),
         cp.TaskDefinition(),
     ]),
     {"version", "tasks[0].max_attempts", "tasks[0].machine_preset", "tasks[1].task_identifier",
      "tasks[1].default_ttl", "tasks[2].task_identifier"}),
    ("PromoteWorker", cp.PromoteWorkerRequest(environment_id="env_x"), {"worker_id"}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "request_message", "fields"),
    BAD_REQUESTS,
    ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(BAD_REQUESTS)],
)
async def test_bad_arguments_name_every_field(
    admin: Stub, method: str, request_message: Any, fields: set[str]
) -> None:
    call = getattr(admin, method)(request_message)
    if method == "WatchInvalidations":
        call = call.read()
    exc = await expect_error(call, INVALID)
    assert set(details_of(exc).fields) == fields, details_of(exc)


# -- organizations, projects, environments --------------------------------------------------


async def test_duplicates_and_unknown_parents(admin: Stub, seeded: Seeded) -> None:
    exc = await expect_error(
        admin.CreateOrganization(
            cp.CreateOrganizationRequest(slug=seeded.organization.slug, title="again")
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert details_of(exc).metadata["constraint"] == "organizations_slug_key"
    exc = await expect_error(
        admin.CreateProject(
            cp.CreateProjectRequest(
                organization_id="org_cmissing000000000000000000", slug="p", name="p"
            )
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert details_of(exc).fields == ["organization_id"]
    await expect_error(
        admin.CreateEnvironment(
            cp.CreateEnvironmentRequest(
                project_id=seeded.project.id, slug=seeded.environment.slug, type=PRODUCTION
            )
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    await expect_error(
        admin.PauseEnvironment(
            cp.PauseEnvironmentRequest(environment_id="env_cmissing000000000000000000")
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_batch_get_returns_found_and_missing_in_request_order(
    internal: Stub, admin: Stub
) -> None:
    first = await seed(admin)
    second = await seed(admin, organization=first.organization)
    await internal.GetEnvironment(
        cp.GetEnvironmentRequest(environment_id=second.env_id)
    )  # one cached
    missing = "env_cmissing000000000000000001"
    reply = await internal.BatchGetEnvironments(
        cp.BatchGetEnvironmentsRequest(
            environment_ids=[second.env_id, missing, first.env_id, second.env_id]
        )
    )
    assert [e.id for e in reply.environments] == [second.env_id, first.env_id]
    assert list(reply.missing_ids) == [missing]
    await expect_error(
        internal.GetEnvironment(cp.GetEnvironmentRequest(environment_id=missing)),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_pause_and_resume(internal: Stub, admin: Stub, seeded: Seeded) -> None:
    get = cp.GetEnvironmentRequest(environment_id=seeded.env_id)
    assert not (await internal.GetEnvironment(get)).environment.paused
    paused = await admin.PauseEnvironment(cp.PauseEnvironmentRequest(environment_id=seeded.env_id))
    assert paused.environment.paused
    assert (await internal.GetEnvironment(get)).environment.paused
    assert (await authenticate(internal, seeded.api_key)).paused
    await admin.ResumeEnvironment(cp.ResumeEnvironmentRequest(environment_id=seeded.env_id))
    assert not (await internal.GetEnvironment(get)).environment.paused


async def test_reads_are_cached_not_reread(
    internal: Stub, seeded: Seeded, controlplane_writer: asyncpg.Connection
) -> None:
    """A change made behind the service's back (no invalidation) is not seen until the TTL:
    the cache really serves the reads, so the invalidation tests prove something."""
    get = cp.GetEnvironmentRequest(environment_id=seeded.env_id)
    await internal.GetEnvironment(get)
    await controlplane_writer.execute(
        "UPDATE runtime_environments SET paused = true WHERE id = $1", seeded.env_id
    )
    assert not (await internal.GetEnvironment(get)).environment.paused


# -- flags ---------------------------------------------------------------------------------


async def test_flags_merge_and_remove(internal: Stub, admin: Stub, seeded: Seeded) -> None:
    get = cp.GetOrganizationFlagsRequest(organization_id=seeded.org_id)
    assert (await internal.GetOrganizationFlags(get)).flags == cp.OrganizationFlags(
        organization_id=seeded.org_id
    )
    await admin.SetOrganizationFlags(cp.SetOrganizationFlagsRequest(
        organization_id=seeded.org_id, mollifier_enabled=True, set_extra={"a": "1", "b": "2"}))  # fmt: skip
    reply = await admin.SetOrganizationFlags(cp.SetOrganizationFlagsRequest(
        organization_id=seeded.org_id, mollifier_shadow_mode=True, set_extra={"c": "3"}, remove_extra=["a"]))  # fmt: skip
    expected = cp.OrganizationFlags(
        organization_id=seeded.org_id,
        mollifier_enabled=True,
        mollifier_shadow_mode=True,
        extra={"b": "2", "c": "3"},
    )
    assert reply.flags == expected
    assert (await internal.GetOrganizationFlags(get)).flags == expected
    await expect_error(
        internal.GetOrganizationFlags(
            cp.GetOrganizationFlagsRequest(organization_id="org_cmissing000000000000000000")
        ),
        grpc.StatusCode.NOT_FOUND,
    )


# -- workers -------------------------------------------------------------------------------


def task(name: str, **kw: Any) -> cp.TaskDefinition:
    return cp.TaskDefinition(task_identifier=name, **kw)


async def register(
    admin: Stub, env_id: str, version: str, *tasks: cp.TaskDefinition
) -> cp.RegisterWorkerResponse:
    return await admin.RegisterWorker(
        cp.RegisterWorkerRequest(
            environment_id=env_id, version=version, sdk_version="4.0.0", tasks=tasks
        )
    )


async def resolve(
    internal: Stub, env_id: str, worker: str = "", tasks: tuple[str, ...] = ()
) -> cp.ResolveWorkerVersionResponse:
    return await internal.ResolveWorkerVersion(
        cp.ResolveWorkerVersionRequest(environment_id=env_id, worker=worker, task_identifiers=tasks)
    )


async def test_development_resolves_the_given_or_most_recent_worker(
    internal: Stub, admin: Stub, seeded: Seeded
) -> None:
    env_id = seeded.env_id
    exc = await expect_error(resolve(internal, env_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert details_of(exc).reason == "NO_CURRENT_WORKER"
    v1 = await register(admin, env_id, "20261125.1", task("email", queue="mail", max_attempts=5,
                        default_ttl=duration_pb2.Duration(seconds=600), machine_preset="micro"), task("sms"))  # fmt: skip
    assert [t.queue for t in v1.tasks] == ["mail", "task/sms"]
    assert v1.tasks[1].max_attempts == 3
    assert v1.tasks[1].machine_preset == "small-1x"
    assert not v1.tasks[1].HasField("default_ttl")
    assert (await resolve(internal, env_id)).worker.id == v1.worker.id
    v2 = await register(admin, env_id, "20261125.2", task("email"))
    latest = await resolve(internal, env_id)
    assert latest.worker.id == v2.worker.id
    assert not latest.worker.current
    by_version = await resolve(internal, env_id, "20261125.1", ("sms", "email"))
    assert by_version.worker.id == v1.worker.id
    assert [t.task_identifier for t in by_version.tasks] == ["sms", "email"]
    assert by_version.tasks[1].default_ttl.seconds == 600
    assert by_version.tasks[1].max_attempts == 5
    assert (await resolve(internal, env_id, v1.worker.id)).worker.version == "20261125.1"
    exc = await expect_error(resolve(internal, env_id, tasks=("sms",)), grpc.StatusCode.NOT_FOUND)
    assert details_of(exc).reason == "TASK_NOT_FOUND"
    assert details_of(exc).fields == ["task_identifiers[0]"]
    await expect_error(resolve(internal, env_id, "nope"), grpc.StatusCode.NOT_FOUND)
    await expect_error(
        admin.PromoteWorker(cp.PromoteWorkerRequest(environment_id=env_id, worker_id=v1.worker.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


async def test_deployed_resolves_the_given_or_promoted_worker(internal: Stub, admin: Stub) -> None:
    prod = await seed(admin, PRODUCTION)
    v1 = await register(admin, prod.env_id, "1.0.0", task("email"))
    v2 = await register(admin, prod.env_id, "1.0.1", task("email"))
    exc = await expect_error(resolve(internal, prod.env_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert "promoted" in details_of(exc).message
    promoted = await admin.PromoteWorker(
        cp.PromoteWorkerRequest(environment_id=prod.env_id, worker_id=v1.worker.id)
    )
    assert promoted.worker.current
    current = await resolve(internal, prod.env_id)
    assert current.worker.id == v1.worker.id
    assert current.worker.current
    assert (await resolve(internal, prod.env_id, "1.0.1")).worker.id == v2.worker.id
    await admin.PromoteWorker(
        cp.PromoteWorkerRequest(environment_id=prod.env_id, worker_id=v2.worker.id)
    )
    assert (await resolve(internal, prod.env_id)).worker.id == v2.worker.id  # not the cached v1
    other = await seed(admin, PRODUCTION)
    exc = await expect_error(
        admin.PromoteWorker(
            cp.PromoteWorkerRequest(environment_id=other.env_id, worker_id=v1.worker.id)
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert details_of(exc).fields == ["worker_id"]


async def test_registering_a_worker_again_is_idempotent(admin: Stub, seeded: Seeded) -> None:
    first = await register(admin, seeded.env_id, "7", task("a"), task("b", max_attempts=2))
    again = await register(admin, seeded.env_id, "7", task("b", max_attempts=2), task("a"))
    assert again.worker.id == first.worker.id
    assert list(again.tasks) == list(first.tasks)
    exc = await expect_error(
        register(admin, seeded.env_id, "7", task("a")), grpc.StatusCode.ALREADY_EXISTS
    )
    assert details_of(exc).fields == ["version"]


# -- a database that is down ---------------------------------------------------------------


async def test_a_database_that_is_down_is_retryable_and_not_serving(stack: LocalStack) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/runops_controlplane"
    plane = await start_control_plane(
        stack,
        controlplane_db={"writer_url": dead, "replica_url": ()},
        feed_start_timeout_seconds=0,
    )
    try:
        internal = stub(plane.app.target, INTERNAL_TOKEN)
        exc = await expect_error(
            internal.GetEnvironment(
                cp.GetEnvironmentRequest(environment_id="env_cnothere000000000000000000")
            ),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert details_of(exc).retry_after is not None
        health: Any = health_pb2_grpc.HealthStub(create_channel(plane.app.target))
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not plane.cache.enabled  # no invalidation feed, so nothing may be cached
    finally:
        await plane.app.stop(grace=1)
