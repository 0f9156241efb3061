"""`runops admin` in-process against the session control plane, and `runops up`'s seed_demo."""

from __future__ import annotations

import json
import re
import secrets
import shlex
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from runops.cli.admin import TARGET_ENV, TOKEN_ENV, run_admin
from runops.cli.up import UpContext, seed_demo_async
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.controlplane.v1.controlplane_pb2_grpc import ControlPlaneServiceStub
from runops.kit.channels import create_channel
from runops.localstack import LocalStack
from runops.localstack.ports import free_port
from runops.localstack.services import ServiceProcess
from runops.localstack.settings import ADMIN_TOKEN, INTERNAL_TOKEN
from services.controlplane.app import ControlPlane

if TYPE_CHECKING:
    from runops.controlplane.v1.controlplane_pb2_grpc import ControlPlaneServiceAsyncStub

KEY = re.compile(r"api key:\s+(rk_\S+)")


@pytest.fixture(autouse=True)
def _no_ambient_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's sourced runops.env must not point these tests elsewhere."""
    monkeypatch.delenv(TARGET_ENV, raising=False)
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture
async def resolver(control_plane: ControlPlane) -> AsyncIterator[ControlPlaneServiceAsyncStub]:
    async with create_channel(control_plane.app.target, token=INTERNAL_TOKEN) as channel:
        yield ControlPlaneServiceStub(channel)


class Cli:
    def __init__(self, target: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.target = target
        self._capsys = capsys

    async def __call__(self, *argv: str, connect: bool = True) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) of `runops admin ARGV` (+ target and admin token)."""
        extra = ["--target", self.target, "--admin-token", ADMIN_TOKEN] if connect else []
        code = await run_admin([*argv, *extra])
        captured = self._capsys.readouterr()
        return code, captured.out, captured.err


@pytest.fixture
def cli(control_plane: ControlPlane, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(control_plane.app.target, capsys)


def _slug(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


async def _bootstrap(cli: Cli) -> dict[str, object]:
    code, out, err = await cli("bootstrap", "--slug", _slug("cli"), "--json")
    assert code == 0, err
    result: dict[str, object] = json.loads(out)
    return result


async def test_bootstrap_prints_a_key_that_authenticates(
    cli: Cli, resolver: ControlPlaneServiceAsyncStub
) -> None:
    slug = _slug("cli")
    code, out, err = await cli("bootstrap", "--slug", slug, "--type", "development")
    assert code == 0, err
    keys = KEY.findall(out)
    assert len(keys) == 1, out
    assert "shown only once" in out
    got = await resolver.AuthenticateApiKey(cp.AuthenticateApiKeyRequest(api_key=keys[0]))
    assert got.environment.organization.slug == slug
    assert got.environment.id in out

    # The same slug again fails (ALREADY_EXISTS, exit 1) unless asked to pick a fresh one.
    code, _, err = await cli("bootstrap", "--slug", slug)
    assert code == 1
    assert err.startswith("error: ")
    code, out, err = await cli("bootstrap", "--slug", slug, "--suffix-if-taken")
    assert code == 0, err
    assert f"slug '{slug}' was taken" in out


async def test_create_env_with_a_bad_slug_names_the_field(cli: Cli) -> None:
    project = await _bootstrap(cli)
    project_id = str(project["project"]["id"])  # type: ignore[index]
    code, out, err = await cli(
        "create-env", "--project", project_id, "--slug", "Not A Slug!", "--type", "staging"
    )
    assert code == 2
    assert out == ""
    assert err.startswith("error: ")
    assert re.search(r"^  slug: must be a slug", err, re.MULTILINE), err

    code, out, err = await cli(
        "create-env", "--project", project_id, "--slug", "stg", "--type", "staging"
    )
    assert code == 0, err
    assert "type:          STAGING" in out
    assert KEY.search(out)


async def test_missing_token_names_the_env_var(cli: Cli) -> None:
    code, out, err = await cli("get-env", "--env", "env_x", "--target", cli.target, connect=False)
    assert code == 2
    assert out == ""
    assert "RUNOPS_ADMIN_TOKEN" in err
    assert "--admin-token" in err

    code, _, err = await cli("get-env", "--env", "env_x", connect=False)
    assert code == 2
    assert "RUNOPS_CONTROLPLANE_TARGET" in err


async def test_wrong_token_exits_1(cli: Cli) -> None:
    code, _, err = await cli(
        "create-org", "--slug", _slug("x"), "--title", "X", "--target", cli.target,
        "--admin-token", "wrong", connect=False,
    )  # fmt: skip
    assert code == 1
    assert "admin token is not valid" in err


async def test_pause_then_get_env_shows_paused(cli: Cli) -> None:
    env_id = str(
        (await _bootstrap(cli))["environments"][0]["environment"]["id"]  # type: ignore[index]
    )
    code, out, err = await cli("pause", "--env", env_id)
    assert code == 0, err
    code, out, err = await cli("get-env", "--env", env_id)
    assert code == 0, err
    assert f"environment {env_id}" in out
    assert "paused:        yes" in out

    code, out, err = await cli("resume", "--env", env_id, "--json")
    assert code == 0, err
    assert json.loads(out)["environment"].get("paused", False) is False
    code, out, _ = await cli("get-env", "--env", env_id)
    assert "paused:        no" in out

    code, out, err = await cli("rotate-key", "--env", env_id)
    assert code == 0, err
    assert KEY.search(out)


async def test_set_flags(cli: Cli) -> None:
    org_id = str((await _bootstrap(cli))["organization"]["id"])  # type: ignore[index]
    code, out, err = await cli(
        "set-flags", "--org", org_id, "--mollifier-enabled", "true", "--set", "tier=gold"
    )
    assert code == 0, err
    assert "mollifier_enabled:      true" in out
    assert "tier = gold" in out
    code, out, err = await cli("set-flags", "--org", org_id, "--remove", "tier", "--json")
    assert code == 0, err
    flags = json.loads(out)["flags"]
    assert flags["mollifierEnabled"] is True
    assert "tier" not in flags.get("extra", {})

    code, _, err = await cli("set-flags", "--org", org_id, "--set", "novalue")
    assert code == 2
    assert "NAME=VALUE" in err


async def test_connection_from_state_dir(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "runops.env").write_text(
        f"export {TARGET_ENV}={shlex.quote(cli.target)}\nexport {TOKEN_ENV}={shlex.quote(ADMIN_TOKEN)}\n"
    )
    code, out, err = await cli(
        "create-org", "--slug", _slug("sd"), "--title", "From state dir",
        "--state-dir", str(tmp_path), connect=False,
    )  # fmt: skip
    assert code == 0, err
    assert "created organization org_" in out

    code, _, err = await cli(
        "get-env", "--env", "env_x", "--state-dir", str(tmp_path / "absent"), connect=False
    )
    assert code == 2
    assert "runops.env not found" in err


async def test_seed_demo(
    control_plane: ControlPlane,
    stack: LocalStack,
    resolver: ControlPlaneServiceAsyncStub,
    tmp_path: Path,
) -> None:
    port = int(control_plane.app.target.rsplit(":", 1)[1])
    ctx = UpContext(
        stack=stack,
        services=[ServiceProcess("controlplane", port, 0, tmp_path / "controlplane.log")],
        admin_token=ADMIN_TOKEN,
        internal_token=INTERNAL_TOKEN,
    )
    # On this test's loop (grpc.aio must not meet a second loop in another thread). Twice:
    # the second run finds "demo" taken, as with a reused --state-dir.
    await seed_demo_async(ctx)
    lines = await seed_demo_async(ctx)
    assert lines is not None
    text = "\n".join(lines)
    env_id, api_key = ctx.env["RUNOPS_DEMO_ENVIRONMENT_ID"], ctx.env["RUNOPS_DEMO_API_KEY"]
    assert env_id in text
    assert api_key in text
    assert "'demo' exists" in text
    got = await resolver.AuthenticateApiKey(cp.AuthenticateApiKeyRequest(api_key=api_key))
    assert got.environment.id == env_id
    assert got.environment.organization.slug.startswith("demo-")

    assert await seed_demo_async(UpContext(stack=stack, services=[])) is None


async def test_each_bad_input_is_one_error_line(cli: Cli, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "runops.env").write_text(f"export {TARGET_ENV}='unterminated\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "runops.env").write_text("")
    closed = f"127.0.0.1:{free_port()}"
    connect = ["--target", cli.target, "--admin-token", ADMIN_TOKEN]
    cases = [
        # (argv, exit code, what stderr says)
        (["get-env", "--env", "env_unknown", *connect], 1, "environment env_unknown does not exist"),
        (["get-env", "--env", "env_x", "--target", closed, "--admin-token", ADMIN_TOKEN], 1,
         f"(is the control plane running at {closed}?)"),
        (["get-env", "--env", "env_x", "--state-dir", str(broken)], 2,
         "runops.env:1: No closing quotation"),
        (["get-env", "--env", "env_x", "--state-dir", str(empty)], 2, "no control-plane target"),
        (["set-flags", "--org", "org_x", "--mollifier-enabled", "maybe", *connect], 2,
         "expected true or false, got 'maybe'"),
        (["get-env", *connect], 2, "the following arguments are required: --env"),
    ]  # fmt: skip
    for argv, wanted_code, wanted in cases:
        code, out, err = await cli(*argv, connect=False)
        assert (code, out) == (wanted_code, ""), (argv, err)
        assert "Traceback" not in err
        assert len([line for line in err.splitlines() if "error: " in line]) == 1, err
        assert wanted in err, (argv, err)
