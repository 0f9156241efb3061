"""The one list of runops services and proto packages.

Codegen, migrations, `runops up`, the service launcher and the tests read it; adding a service is
one `Service` entry here plus its package (docs/adding-a-service.md). The order of SERVICES is
the start order of `runops up` and the order migrations apply in.

Services that are listed but not built yet are fine: `available()` returns those whose package
(`services/<name>/__main__.py`) exists.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Imported where used: codegen imports this module and needs no pydantic.
    from runops.kit.settings import ServerSettings

# Databases migrations target: services/<service>/migrations/<database>/. "controlplane" is the
# control-plane database (it also holds LEGACY run rows), "runops" the run-ops one (NEW rows).
DATABASES = ("controlplane", "runops")

# Every service listens on these unless RUNOPS_GRPC_PORT / RUNOPS_METRICS_PORT say otherwise
# (ServerSettings' defaults; one service per container in docker/ and Kubernetes).
DEFAULT_GRPC_PORT = 50051
DEFAULT_METRICS_PORT = 9464


@dataclass(frozen=True)
class Companion:
    """A process of a service other than its gRPC server (same image, settings and environment),
    e.g. the mollifier's drainer. It serves only the kit's health, reflection and metrics."""

    name: str  # "<service>-<role>": its compose service, k8s manifest and log file
    module: str  # what `python -m` runs
    # What the service's own server is told while this companion runs beside it.
    server_env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Service:
    name: str  # services.<name>, shared/runops/<name>/, RUNOPS_<NAME>_TARGET
    contract: str  # full name of its gRPC service: <proto package>.<Service>
    # Databases its migrations may target, a subset of DATABASES.
    databases: tuple[str, ...]
    # "module:Class" of its ServerSettings subclass (RUNOPS_* variables).
    settings: str
    grpc_port: int = DEFAULT_GRPC_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    companions: tuple[Companion, ...] = ()

    @property
    def module(self) -> str:
        """What `python -m` runs."""
        return f"services.{self.name}"

    @property
    def proto_package(self) -> str:
        """e.g. runops.controlplane.v1: protos/runops/<name>/v1, generated into the same path."""
        return self.contract.rsplit(".", 1)[0]

    @property
    def target_variable(self) -> str:
        """The environment variable other services find it by (host:port)."""
        return f"RUNOPS_{self.name.upper()}_TARGET"

    def exists(self) -> bool:
        """Its package is there (`services/<name>/__main__.py`), so it can be started."""
        return any((root / self.name / "__main__.py").is_file() for root in services_roots())

    def settings_class(self) -> type[ServerSettings]:
        """Imports the service's settings module (only for a service that exists)."""
        from runops.kit.settings import ServerSettings

        module, _, attribute = self.settings.partition(":")
        cls = getattr(importlib.import_module(module), attribute)
        if not (isinstance(cls, type) and issubclass(cls, ServerSettings)):
            raise TypeError(f"{self.settings} is not a ServerSettings subclass")
        return cls


SERVICES: tuple[Service, ...] = (
    Service(
        name="controlplane",
        contract="runops.controlplane.v1.ControlPlaneService",
        databases=("controlplane",),
        settings="services.controlplane.settings:ControlPlaneSettings",
    ),
    Service(
        name="runstore",
        contract="runops.runstore.v1.RunStoreService",
        # LEGACY rows in the control-plane database, NEW rows in the run-ops database (spec §1).
        databases=("controlplane", "runops"),
        settings="services.runstore.settings:RunStoreSettings",
    ),
    Service(
        name="mollifier",
        contract="runops.mollifier.v1.MollifierService",
        databases=(),  # Redis; its runs reach Postgres through the run store
        settings="services.mollifier.settings:MollifierSettings",
        # The drainer as its own process (scaled apart from the front door); the server's own
        # drainer is switched off meanwhile (several drainers would be safe, not needed).
        companions=(
            Companion(
                name="mollifier-drainer",
                module="services.mollifier.drainer",
                server_env=(("RUNOPS_DRAINER_ENABLED", "false"),),
            ),
        ),
    ),
    Service(
        name="ingest",
        contract="runops.ingest.v1.BatchIngestService",
        databases=(),  # S3 and the run store
        settings="services.ingest.settings:IngestSettings",
    ),
)

# Proto packages that are no service's contract: shared messages and options, and the kit tests'
# own tiny contract (runops.testing.v1, never served by a service).
SHARED_PROTO_PACKAGES = ("common",)
TEST_PROTO_PACKAGES = ("testing",)


def names() -> tuple[str, ...]:
    return tuple(s.name for s in SERVICES)


def service(name: str) -> Service:
    """The entry for `name`; ValueError naming the known services otherwise."""
    for entry in SERVICES:
        if entry.name == name:
            return entry
    raise ValueError(f"unknown service {name!r}: one of {', '.join(names())}")


def available() -> list[Service]:
    """The services whose package exists, in start order."""
    return [s for s in SERVICES if s.exists()]


def proto_packages() -> tuple[str, ...]:
    """Every directory under protos/runops/ (and shared/runops/) that holds a v1 contract."""
    own = tuple(s.proto_package.split(".")[1] for s in SERVICES)
    return (*SHARED_PROTO_PACKAGES, *own, *TEST_PROTO_PACKAGES)


def services_roots() -> list[Path]:
    """The directories of the `services` package (a namespace may have several)."""
    try:
        spec = importlib.util.find_spec("services")
    except (ImportError, ValueError):
        return []
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [Path(p) for p in spec.submodule_search_locations if Path(p).is_dir()]
