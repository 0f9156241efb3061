"""`runops admin`: the control plane's admin RPCs from a shell.

grpc and the generated code are imported only when a command runs, so that building the
`runops` parser (every `runops ...` invocation) stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runops.cli.errors import UsageError, print_error, report_call_failure

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from runops.common.v1.common_pb2 import EnvironmentType
    from runops.controlplane.v1 import controlplane_pb2 as cp
    from runops.controlplane.v1.controlplane_pb2_grpc import ControlPlaneServiceAsyncStub

TARGET_ENV = "RUNOPS_CONTROLPLANE_TARGET"
TOKEN_ENV = "RUNOPS_ADMIN_TOKEN"
ENV_FILE = "runops.env"
ENV_TYPES = ("development", "staging", "preview", "production")
CALL_TIMEOUT_SECONDS = 15.0
SLUG_LIMIT = 64
KEY_NOTE = "(shown only once: store it now; `runops admin rotate-key` issues a new one)"


@dataclass(frozen=True)
class Bootstrapped:
    organization: cp.Organization
    project: cp.Project
    # (environment, its API key) per requested type
    environments: list[tuple[cp.Environment, str]]
    requested_slug: str


# -- bootstrap (also used by `runops up` to seed its demo environment) ------------------------
def _env_type(name: str) -> EnvironmentType.ValueType:
    from runops.common.v1 import common_pb2

    return common_pb2.EnvironmentType.Value(f"ENVIRONMENT_TYPE_{name.upper()}")


async def bootstrap(
    stub: ControlPlaneServiceAsyncStub,
    slug: str,
    *,
    title: str | None = None,
    types: Sequence[str] = ("development",),
    suffix_if_taken: bool = False,
) -> Bootstrapped:
    """An organization and a project, both named `slug`, with one environment per type (slug =
    the type's name), created atomically by BootstrapOrganization: a failed attempt leaves
    nothing behind. With `suffix_if_taken`, a taken organization slug becomes
    `<slug>-<random>` (there is no RPC to look an organization up by slug, nor to read an
    existing key back, so a fresh organization is the only way to hand out a key)."""
    import grpc

    from runops.controlplane.v1 import controlplane_pb2 as cp

    environments = [
        cp.NewEnvironment(slug=name, type=_env_type(name)) for name in dict.fromkeys(types)
    ]
    org_slug = slug
    for _attempt in range(3):
        try:
            created = await stub.BootstrapOrganization(
                cp.BootstrapOrganizationRequest(
                    slug=org_slug, title=title or org_slug, environments=environments
                ),
                timeout=CALL_TIMEOUT_SECONDS,
            )
            break
        except grpc.aio.AioRpcError as exc:
            if not suffix_if_taken or exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            org_slug = f"{slug[: SLUG_LIMIT - 7].rstrip('-')}-{secrets.token_hex(3)}"
    else:
        raise RuntimeError(f"could not find a free organization slug for {slug!r}")
    return Bootstrapped(
        created.organization,
        created.project,
        [(env.environment, env.api_key) for env in created.environments],
        slug,
    )


async def bootstrap_at(
    target: str,
    token: str,
    slug: str,
    *,
    types: Sequence[str] = ("development",),
    suffix_if_taken: bool = False,
) -> Bootstrapped:
    """bootstrap() over a new channel to `target` with the admin `token`."""
    from runops.controlplane.v1.controlplane_pb2_grpc import ControlPlaneServiceStub
    from runops.kit.channels import create_channel

    async with create_channel(target, token=token) as channel:
        stub = ControlPlaneServiceStub(channel)
        return await bootstrap(stub, slug, types=types, suffix_if_taken=suffix_if_taken)


# -- arguments ---------------------------------------------------------------------------------
def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _assignment(value: str) -> tuple[str, str]:
    name, sep, flag_value = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    return name, flag_value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `admin` subcommands and their options onto `parser`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        dest="controlplane_target",
        help=f"control plane host:port [env {TARGET_ENV}]",
        metavar="HOST:PORT",
    )
    common.add_argument("--admin-token", help=f"admin bearer token [env {TOKEN_ENV}]")
    common.add_argument(
        "--state-dir",
        type=Path,
        help=f"a `runops up --state-dir`: read target and token from its {ENV_FILE} when "
        "neither flag nor env var sets them",
    )
    common.add_argument("--json", action="store_true", help="print the response as JSON")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, text: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, help=text, description=text, parents=[common])

    def env_arg(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--env", required=True, metavar="ID", help="environment id (env_...)")

    sub = action("create-org", "create an organization")
    sub.add_argument("--slug", required=True)
    sub.add_argument("--title", required=True)
    sub = action("create-project", "create a project in an organization")
    sub.add_argument("--org", required=True, metavar="ID", help="organization id (org_...)")
    sub.add_argument("--slug", required=True)
    sub.add_argument("--name", required=True)
    sub = action("create-env", "create an environment and print its API key (shown once)")
    sub.add_argument("--project", required=True, metavar="ID", help="project id (proj_...)")
    sub.add_argument("--slug", required=True)
    sub.add_argument("--type", required=True, choices=ENV_TYPES)
    env_arg(action("rotate-key", "issue a new API key; the previous one stops working"))
    env_arg(action("pause", "pause an environment"))
    env_arg(action("resume", "resume a paused environment"))
    env_arg(action("get-env", "show an environment"))
    sub = action("set-flags", "change an organization's flags")
    sub.add_argument("--org", required=True, metavar="ID", help="organization id (org_...)")
    sub.add_argument("--mollifier-enabled", type=_bool, metavar="true|false")
    sub.add_argument("--shadow-mode", type=_bool, metavar="true|false")
    sub.add_argument("--set", type=_assignment, action="append", default=[], metavar="NAME=VALUE")
    sub.add_argument("--remove", action="append", default=[], metavar="NAME")
    sub = action(
        "bootstrap", "create an organization, project and environment(s); print their API keys"
    )
    sub.add_argument("--slug", default="demo", help="organization and project slug (demo)")
    sub.add_argument("--title", help="organization title (default: the slug)")
    sub.add_argument(
        "--type",
        dest="types",
        action="append",
        choices=ENV_TYPES,
        help="environment type; repeat for several (default: development)",
    )
    sub.add_argument(
        "--suffix-if-taken",
        action="store_true",
        help="if the slug is taken, use <slug>-<random> instead of failing",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runops admin", description="control-plane admin")
    add_arguments(parser)
    return parser


# -- connection ----------------------------------------------------------------------------------
def read_env_file(path: Path) -> dict[str, str]:
    """`export NAME=value` lines (as `runops up` writes them) as a dict; UsageError naming the
    line that is not one."""
    values: dict[str, str] = {}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    for number, line in enumerate(text.splitlines(), 1):
        name, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and name and not name.startswith("#"):
            try:
                words = shlex.split(value)
            except ValueError as exc:
                raise UsageError(f"{path}:{number}: {exc} (expected export NAME=value)") from exc
            values[name.strip()] = words[0] if words else ""
    return values


def resolve_connection(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[str, str]:
    """(target, admin token): flag, else env var, else the --state-dir's env file."""
    target: str | None = args.controlplane_target or environ.get(TARGET_ENV)
    token: str | None = args.admin_token or environ.get(TOKEN_ENV)
    if (not target or not token) and args.state_dir is not None:
        path = args.state_dir / ENV_FILE
        if not path.is_file():
            raise UsageError(f"{path} not found: pass the --state-dir that `runops up` used")
        saved = read_env_file(path)
        target, token = target or saved.get(TARGET_ENV), token or saved.get(TOKEN_ENV)
    hint = "(or --state-dir of a running `runops up`)"
    if not target:
        raise UsageError(f"no control-plane target: pass --target or set {TARGET_ENV} {hint}")
    if not token:
        raise UsageError(f"no admin token: pass --admin-token or set {TOKEN_ENV} {hint}")
    return target, token


# -- output ----------------------------------------------------------------------------------
def _environment_text(env: cp.Environment) -> list[str]:
    from runops.common.v1 import common_pb2

    kind = common_pb2.EnvironmentType.Name(env.type).removeprefix("ENVIRONMENT_TYPE_")
    return [
        f"environment {env.id}",
        f"  slug:          {env.slug}",
        f"  type:          {kind}",
        f"  paused:        {'yes' if env.paused else 'no'}",
        f"  project:       {env.project.id} ({env.project.slug})",
        f"  organization:  {env.organization.id} ({env.organization.slug})",
        f"  api key:       {env.api_key_prefix + '...' if env.api_key_prefix else '(none)'}",
    ]


def _flags_text(flags: cp.OrganizationFlags) -> list[str]:
    lines = [
        f"flags of organization {flags.organization_id}",
        f"  mollifier_enabled:      {str(flags.mollifier_enabled).lower()}",
        f"  mollifier_shadow_mode:  {str(flags.mollifier_shadow_mode).lower()}",
    ]
    lines += [f"  {name} = {value}" for name, value in sorted(flags.extra.items())]
    return lines


def bootstrap_text(result: Bootstrapped) -> list[str]:
    org, project = result.organization, result.project
    lines = [f"organization {org.id} ({org.slug})", f"project      {project.id} ({project.slug})"]
    if org.slug != result.requested_slug:
        lines.append(f"(slug {result.requested_slug!r} was taken; used {org.slug!r})")
    for env, key in result.environments:
        lines += [f"environment  {env.id} ({env.slug})", f"  api key:   {key}"]
    return [*lines, KEY_NOTE]


def _bootstrap_json(result: Bootstrapped) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return {
        "organization": MessageToDict(result.organization),
        "project": MessageToDict(result.project),
        "environments": [
            {"environment": MessageToDict(env), "apiKey": key} for env, key in result.environments
        ],
    }


# -- commands ------------------------------------------------------------------------------------
async def _call(
    stub: ControlPlaneServiceAsyncStub, args: argparse.Namespace
) -> tuple[list[str], Message | dict[str, Any]]:
    """Runs the action: (text lines, the response for --json)."""
    from runops.controlplane.v1 import controlplane_pb2 as cp

    timeout = CALL_TIMEOUT_SECONDS
    match args.action:
        case "create-org":
            org = await stub.CreateOrganization(
                cp.CreateOrganizationRequest(slug=args.slug, title=args.title), timeout=timeout
            )
            o = org.organization
            return [f"created organization {o.id} (slug {o.slug}, title {o.title!r})"], org
        case "create-project":
            created = await stub.CreateProject(
                cp.CreateProjectRequest(organization_id=args.org, slug=args.slug, name=args.name),
                timeout=timeout,
            )
            p = created.project
            text = f"created project {p.id} (slug {p.slug}, ref {p.external_ref}) in {args.org}"
            return [text], created
        case "create-env":
            env = await stub.CreateEnvironment(
                cp.CreateEnvironmentRequest(
                    project_id=args.project, slug=args.slug, type=_env_type(args.type)
                ),
                timeout=timeout,
            )
            lines = ["created", *_environment_text(env.environment)]
            return [*lines, f"api key: {env.api_key}", KEY_NOTE], env
        case "rotate-key":
            rotated = await stub.RotateApiKey(
                cp.RotateApiKeyRequest(environment_id=args.env), timeout=timeout
            )
            lines = [f"new API key of {args.env}; the previous key no longer works"]
            return [*lines, f"api key: {rotated.api_key}", KEY_NOTE], rotated
        case "pause":
            paused = await stub.PauseEnvironment(
                cp.PauseEnvironmentRequest(environment_id=args.env), timeout=timeout
            )
            return ["paused", *_environment_text(paused.environment)], paused
        case "resume":
            resumed = await stub.ResumeEnvironment(
                cp.ResumeEnvironmentRequest(environment_id=args.env), timeout=timeout
            )
            return ["resumed", *_environment_text(resumed.environment)], resumed
        case "get-env":
            got = await stub.GetEnvironment(
                cp.GetEnvironmentRequest(environment_id=args.env), timeout=timeout
            )
            return _environment_text(got.environment), got
        case "set-flags":
            request = cp.SetOrganizationFlagsRequest(
                organization_id=args.org, set_extra=dict(args.set), remove_extra=args.remove
            )
            if args.mollifier_enabled is not None:
                request.mollifier_enabled = args.mollifier_enabled
            if args.shadow_mode is not None:
                request.mollifier_shadow_mode = args.shadow_mode
            flags = await stub.SetOrganizationFlags(request, timeout=timeout)
            return _flags_text(flags.flags), flags
        case "bootstrap":
            result = await bootstrap(
                stub,
                args.slug,
                title=args.title,
                types=args.types or ("development",),
                suffix_if_taken=args.suffix_if_taken,
            )
            return bootstrap_text(result), _bootstrap_json(result)
    raise UsageError(f"unknown action {args.action!r}")


async def execute(args: argparse.Namespace) -> int:
    """Runs parsed `admin` arguments; prints the result, or `error: ...` to stderr."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from runops.controlplane.v1.controlplane_pb2_grpc import ControlPlaneServiceStub
    from runops.kit.channels import create_channel
    from runops.kit.errors import details_of

    try:
        target, token = resolve_connection(args, os.environ)
    except UsageError as exc:
        print_error(exc)
        return 2
    async with create_channel(target, token=token) as channel:
        try:
            lines, response = await _call(ControlPlaneServiceStub(channel), args)
        except grpc.aio.AioRpcError as exc:
            credential = f"--admin-token / {TOKEN_ENV}"
            return report_call_failure(
                details_of(exc), service="control plane", target=target, credential=credential
            )
    if args.json:
        data = response if isinstance(response, dict) else MessageToDict(response)
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(lines))
    return 0


async def run_admin(argv: Sequence[str] | None = None) -> int:
    """`runops admin ARGV...` in the running event loop; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: usage error (2) or --help (0)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    return await execute(args)


def command(args: argparse.Namespace) -> int:
    """Entry point from `runops admin` (arguments parsed by runops.cli.main)."""
    return asyncio.run(execute(args))


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run_admin(argv))
