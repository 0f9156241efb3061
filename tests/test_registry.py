"""runops.registry agrees with what is really there: protos, generated code, service
packages and their settings, migrations folders, the Docker and Kubernetes manifests."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool

from runops import registry
from runops.kit.postgres import DatabaseSettings
from runops.kit.settings import ENV_PREFIX, ServerSettings
from runops.migrations import EVERY_DATABASE, discover

REPO = Path(__file__).resolve().parents[1]


def test_every_proto_package_is_registered_and_every_registered_one_exists() -> None:
    on_disk = {p.parent.parent.name for p in (REPO / "protos" / "runops").glob("*/v1/*.proto")}
    assert set(registry.proto_packages()) == on_disk
    assert len(registry.proto_packages()) == len(on_disk), "a package is listed twice"


@pytest.mark.parametrize("service", registry.SERVICES, ids=lambda s: s.name)
def test_contract_is_a_service_of_its_generated_package(service: registry.Service) -> None:
    package = importlib.import_module(service.proto_package)
    for module in pkgutil.iter_modules(package.__path__):
        if module.name.endswith("_pb2"):
            importlib.import_module(f"{service.proto_package}.{module.name}")
    found = descriptor_pool.Default().FindServiceByName(service.contract)
    assert found.file.package == service.proto_package
    assert service.proto_package == f"runops.{service.name}.v1"


def test_names_are_unique_and_unknown_names_are_refused() -> None:
    assert len(set(registry.names())) == len(registry.SERVICES)
    assert registry.service("controlplane").module == "services.controlplane"
    assert registry.service("ingest").target_variable == "RUNOPS_INGEST_TARGET"
    with pytest.raises(ValueError, match="unknown service 'billing': one of controlplane"):
        registry.service("billing")


def test_available_services_are_the_packages_that_exist() -> None:
    available = registry.available()
    assert "controlplane" in [s.name for s in available]
    for service in registry.SERVICES:
        package = REPO / "services" / service.name
        assert service.exists() == (package / "__main__.py").is_file(), service.name
        assert (service in available) == service.exists()


@pytest.mark.parametrize("service", registry.available(), ids=lambda s: s.name)
def test_settings_class_and_default_ports(service: registry.Service) -> None:
    cls = service.settings_class()
    assert issubclass(cls, ServerSettings)
    assert cls.model_config.get("env_prefix") == ENV_PREFIX
    fields = cls.model_fields
    assert fields["grpc_port"].default == service.grpc_port
    assert fields["metrics_port"].default == service.metrics_port


@pytest.mark.parametrize("service", registry.available(), ids=lambda s: s.name)
def test_each_database_it_migrates_has_its_settings_block(service: registry.Service) -> None:
    fields = service.settings_class().model_fields
    for database in service.databases:
        assert fields[f"{database}_db"].annotation is DatabaseSettings, database


@pytest.mark.parametrize("service", registry.available(), ids=lambda s: s.name)
def test_migrations_folders_are_declared_databases(service: registry.Service) -> None:
    folders = {p.name for p in (REPO / "services" / service.name / "migrations").glob("*")}
    # `all` applies to every database of the entry (the run store's tables live in both).
    assert folders <= {*service.databases, EVERY_DATABASE}
    for database in registry.DATABASES:
        discover(database)  # raises for a folder the registry does not list


@pytest.mark.parametrize("service", registry.SERVICES, ids=lambda s: s.name)
def test_docker_and_kubernetes_run_every_service_on_its_ports(service: registry.Service) -> None:
    compose = (REPO / "docker" / "compose.yaml").read_text()
    assert f"  {service.name}:\n" in compose
    assert f'command: ["{service.module}"]' in compose
    manifest = (REPO / "docker" / "k8s" / f"{service.name}.yaml").read_text()
    assert f'args: ["{service.module}"]' in manifest
    assert f"containerPort: {service.grpc_port}" in manifest
    assert f"containerPort: {service.metrics_port}" in manifest
    kustomization = (REPO / "docker" / "k8s" / "kustomization.yaml").read_text()
    assert f"  - {service.name}.yaml\n" in kustomization


@pytest.mark.parametrize(
    "companion",
    [c for s in registry.SERVICES for c in s.companions],
    ids=lambda c: c.name,
)
def test_companions_exist_and_run_in_docker_and_kubernetes(companion: registry.Companion) -> None:
    service = next(s for s in registry.SERVICES if companion in s.companions)
    assert companion.name.startswith(f"{service.name}-")
    assert importlib.util.find_spec(f"{companion.module}.__main__") is not None, companion.module
    compose = (REPO / "docker" / "compose.yaml").read_text()
    assert f"  {companion.name}:\n" in compose
    assert f'command: ["{companion.module}"]' in compose
    manifest = (REPO / "docker" / "k8s" / f"{companion.name}.yaml").read_text()
    assert f'args: ["{companion.module}"]' in manifest
    kustomization = (REPO / "docker" / "k8s" / "kustomization.yaml").read_text()
    assert f"  - {companion.name}.yaml\n" in kustomization
    # What the server is told while the companion runs apart is what the deployments say.
    server_manifest = (REPO / "docker" / "k8s" / f"{service.name}.yaml").read_text()
    for variable, value in companion.server_env:
        assert f'{variable}: "{value}"' in compose
        assert f'- name: {variable}\n              value: "{value}"' in server_manifest
