"""BootstrapOrganization (behind `runops admin bootstrap`): all of it, or none of it."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest

from runops.common.v1 import common_pb2
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.kit.errors import details_of
from tests.controlplane.harness import Stub
from tests.harness import expect_error

DEV = common_pb2.ENVIRONMENT_TYPE_DEVELOPMENT
PROD = common_pb2.ENVIRONMENT_TYPE_PRODUCTION


async def _rows(conn: asyncpg.Connection, org_slug: str) -> dict[str, int]:
    """How many rows of each kind hang off the organization with this slug."""
    row = await conn.fetchrow(
        """
        SELECT (SELECT count(*) FROM organizations o WHERE o.slug = $1) AS organizations,
               (SELECT count(*) FROM projects p JOIN organizations o ON o.id = p.organization_id
                 WHERE o.slug = $1) AS projects,
               (SELECT count(*) FROM runtime_environments e
                 JOIN organizations o ON o.id = e.organization_id WHERE o.slug = $1) AS envs,
               (SELECT count(*) FROM api_keys k
                 JOIN runtime_environments e ON e.id = k.environment_id
                 JOIN organizations o ON o.id = e.organization_id WHERE o.slug = $1) AS keys
        """,
        org_slug,
    )
    assert row is not None
    return dict(row)


async def test_bootstrap_creates_every_part_and_its_keys_authenticate(
    admin: Stub, internal: Stub, controlplane_writer: asyncpg.Connection
) -> None:
    slug = f"boot-{secrets.token_hex(4)}"
    created = await admin.BootstrapOrganization(
        cp.BootstrapOrganizationRequest(
            slug=slug,
            title="Boot",
            environments=[
                cp.NewEnvironment(slug="dev", type=DEV),
                cp.NewEnvironment(slug="prod", type=PROD),
            ],
        )
    )
    assert created.organization.slug == slug
    assert (created.project.slug, created.project.name) == (slug, "Boot")
    assert created.project.organization_id == created.organization.id
    assert [e.environment.slug for e in created.environments] == ["dev", "prod"]
    for env in created.environments:
        assert env.api_key.startswith(("rk_dev_", "rk_prod_"))
        got = await internal.AuthenticateApiKey(cp.AuthenticateApiKeyRequest(api_key=env.api_key))
        assert got.environment.id == env.environment.id
        assert got.environment.project.id == created.project.id
        assert got.environment.organization.id == created.organization.id
    assert await _rows(controlplane_writer, slug) == {
        "organizations": 1,
        "projects": 1,
        "envs": 2,
        "keys": 2,
    }


@pytest.fixture
async def failing_key_insert(controlplane_writer: asyncpg.Connection) -> AsyncIterator[str]:
    """An environment slug whose API-key insert fails in the database (a serialization failure
    raised by a trigger), i.e. after the organization, project and earlier environments of the
    same transaction were written. Yields the slug; the trigger is dropped afterwards."""
    slug = f"doomed-{secrets.token_hex(4)}"
    name = f"fail_{slug.replace('-', '_')}"
    await controlplane_writer.execute(
        f"""
        CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF (SELECT slug FROM runtime_environments WHERE id = NEW.environment_id) = '{slug}'
            THEN
                RAISE EXCEPTION 'provoked by the test' USING ERRCODE = 'serialization_failure';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER {name} BEFORE INSERT ON api_keys
            FOR EACH ROW EXECUTE FUNCTION {name}();
        """
    )
    try:
        yield slug
    finally:
        await controlplane_writer.execute(
            f"DROP TRIGGER {name} ON api_keys; DROP FUNCTION {name}()"
        )


async def test_a_bootstrap_failing_midway_leaves_nothing_behind(
    admin: Stub, controlplane_writer: asyncpg.Connection, failing_key_insert: str
) -> None:
    slug = f"boot-{secrets.token_hex(4)}"
    request = cp.BootstrapOrganizationRequest(
        slug=slug,
        title="Half",
        environments=[
            cp.NewEnvironment(slug="dev", type=DEV),
            cp.NewEnvironment(slug=failing_key_insert, type=PROD),
        ],
    )
    exc = await expect_error(admin.BootstrapOrganization(request), grpc.StatusCode.ABORTED)
    assert details_of(exc).reason == "SERIALIZATION_FAILURE"
    assert await _rows(controlplane_writer, slug) == {
        "organizations": 0,
        "projects": 0,
        "envs": 0,
        "keys": 0,
    }

    # Nothing was left holding the slug: the same request minus the doomed part succeeds.
    del request.environments[1]
    created = await admin.BootstrapOrganization(request)
    assert created.organization.slug == slug
    assert await _rows(controlplane_writer, slug) == {
        "organizations": 1,
        "projects": 1,
        "envs": 1,
        "keys": 1,
    }


async def test_a_taken_slug_or_bad_environments_create_nothing(
    admin: Stub, controlplane_writer: asyncpg.Connection
) -> None:
    slug = f"boot-{secrets.token_hex(4)}"
    envs = [cp.NewEnvironment(slug="dev", type=DEV)]
    await admin.BootstrapOrganization(
        cp.BootstrapOrganizationRequest(slug=slug, title="First", environments=envs)
    )
    taken = await expect_error(
        admin.BootstrapOrganization(
            cp.BootstrapOrganizationRequest(slug=slug, title="Second", environments=envs)
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert details_of(taken).metadata["constraint"] == "organizations_slug_key"
    assert await _rows(controlplane_writer, slug) == {
        "organizations": 1,
        "projects": 1,
        "envs": 1,
        "keys": 1,
    }

    other = f"boot-{secrets.token_hex(4)}"
    bad = await expect_error(
        admin.BootstrapOrganization(
            cp.BootstrapOrganizationRequest(
                slug=other,
                title="Bad",
                environments=[
                    cp.NewEnvironment(slug="dev", type=DEV),
                    cp.NewEnvironment(slug="dev", type=PROD),
                    cp.NewEnvironment(slug="Nope!", type=common_pb2.ENVIRONMENT_TYPE_UNSPECIFIED),
                ],
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details_of(bad).fields == [
        "environments[1].slug",
        "environments[2].slug",
        "environments[2].type",
    ]
    empty = await expect_error(
        admin.BootstrapOrganization(cp.BootstrapOrganizationRequest(slug=other, title="Bad")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details_of(empty).fields == ["environments"]
    assert (await _rows(controlplane_writer, other))["organizations"] == 0
