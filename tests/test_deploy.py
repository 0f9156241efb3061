"""docker/compose.yaml and docker/k8s agree with the services (runops.registry and each
settings class), read as YAML (the running containers are checked by tests/e2e/test_containers.py
under .ci/compose): every service and companion runs, each one's environment validates against
its settings class as it would at start-up (every required variable set, directly or via the
ConfigMap/Secret), ports match, health checks use gRPC health and start-up order uses depends_on
conditions, pods are probed natively, limited, non-root and read-only, Services are headless and
the stateless services scale horizontally."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from runops import registry
from runops.kit.settings import ServerSettings, load_settings

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
# ${NAME:-default} / ${NAME} as compose interpolates them (the defaults are what `up` gets).
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _interpolate(value: Any) -> str:
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", str(value))


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return loaded


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _k8s(kind: str, name: str) -> dict[str, Any]:
    for path in [*K8S.glob("*.yaml"), *(K8S / "migrations").glob("*.yaml")]:
        for doc in _documents(path):
            if doc.get("kind") == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} in docker/k8s")


def _processes() -> list[tuple[registry.Service, str, str]]:
    """(service, compose/k8s name, module) of every server and companion."""
    found = []
    for service in registry.SERVICES:
        found.append((service, service.name, service.module))
        found += [(service, c.name, c.module) for c in service.companions]
    return found


PROCESSES = _processes()
IDS = [name for _, name, _ in PROCESSES]


def _validate(
    monkeypatch: pytest.MonkeyPatch, cls: type[ServerSettings], env: dict[str, str]
) -> ServerSettings:
    """The settings the process would start with, given exactly `env` (RUNOPS_* of this
    process's own environment removed first)."""
    import os

    for name in list(os.environ):
        if name.startswith("RUNOPS_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(cls)


@pytest.mark.parametrize(("service", "name", "module"), PROCESSES, ids=IDS)
def test_compose_runs_it_with_valid_settings_and_grpc_health(
    service: registry.Service, name: str, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    compose = _compose()["services"]
    entry = compose[name]
    assert entry["command"] == [module]
    env = {k: _interpolate(v) for k, v in entry["environment"].items()}
    if service.exists():
        settings = _validate(monkeypatch, service.settings_class(), env)
        assert settings.grpc_port == service.grpc_port
        assert settings.metrics_port == service.metrics_port
    # gRPC health against its own port; started only once what it needs is healthy / done.
    probe = " ".join(entry["healthcheck"]["test"])
    assert "HealthStub" in probe
    assert f"127.0.0.1:{service.grpc_port}" in probe
    conditions = {dep: spec["condition"] for dep, spec in entry["depends_on"].items()}
    assert conditions, name
    for dependency, condition in conditions.items():
        assert dependency in compose, (name, dependency)
        assert condition in ("service_healthy", "service_completed_successfully"), dependency
    assert entry["read_only"] is True
    assert entry["cap_drop"] == ["ALL"]
    # Least privilege: only the databases' service role, never the superuser or migrator.
    for variable, value in env.items():
        if variable.endswith(("_WRITER_URL", "_REPLICA_URL")):
            assert value.startswith("postgresql://runops_service:"), variable


def test_compose_has_the_stateful_parts_and_the_migrations_job() -> None:
    services = _compose()["services"]
    for database in ("controlplane-db", "runops-db"):
        assert "wal_level=replica" in services[database]["command"]
        replica = services[f"{database}-replica"]
        assert replica["depends_on"][database]["condition"] == "service_healthy"
    assert "--appendonly" in services["redis"]["command"]
    cluster = [n for n, s in services.items() if "cluster" in s.get("profiles", [])]
    assert {"redis-node-1", "redis-node-2", "redis-node-3", "redis-cluster-create"} <= set(cluster)
    for node in ("redis-node-1", "redis-node-2", "redis-node-3"):
        assert "--appendonly" in services[node]["command"]
    bucket = services["minio-create-bucket"]
    assert bucket["depends_on"]["minio"]["condition"] == "service_healthy"
    migrations = services["migrations"]
    assert "runops_migrator:" in _interpolate(
        migrations["environment"]["RUNOPS_CONTROLPLANE_DB_MIGRATOR_URL"]
    )
    for service in registry.SERVICES:
        if service.databases:
            dependency = services[service.name]["depends_on"]["migrations"]
            assert dependency["condition"] == "service_completed_successfully", service.name


def test_compose_publishes_what_the_e2e_env_file_names() -> None:
    services = _compose()["services"]
    env: dict[str, str] = {}
    for line in (DOCKER / "e2e.env").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    for service in registry.SERVICES:
        port = env[service.target_variable].rpartition(":")[2]
        published = [_interpolate(p) for p in services[service.name]["ports"]]
        wanted = f"{port}:{service.grpc_port}"
        assert any(p == wanted or p.endswith(f":{wanted}") for p in published), service.name
    base = services["controlplane"]["environment"]
    assert env["RUNOPS_ADMIN_TOKEN"] == _interpolate(base["RUNOPS_ADMIN_TOKEN"])
    assert env["RUNOPS_INTERNAL_TOKEN"] == _interpolate(base["RUNOPS_INTERNAL_TOKEN"])


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _k8s_env(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_k8s("ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            env.update(_k8s("Secret", source["secretRef"]["name"])["stringData"])
    for variable in container.get("env", []):
        env[variable["name"]] = str(variable.get("value", "set-from-a-reference"))
    return env


@pytest.mark.parametrize(("service", "name", "module"), PROCESSES, ids=IDS)
def test_kubernetes_runs_it_with_valid_settings_probes_limits_and_hardening(
    service: registry.Service, name: str, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = _k8s("Deployment", f"runops-{name}")
    container = _container(deployment)
    assert container["args"] == [module]
    env = _k8s_env(container)
    if service.exists():
        settings = _validate(monkeypatch, service.settings_class(), env)
        assert settings.grpc_port == service.grpc_port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": service.grpc_port, "metrics": service.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == service.grpc_port, probe
    assert container["livenessProbe"]["grpc"]["service"] == "liveness"
    assert "service" not in container["readinessProbe"]["grpc"]  # the whole server's health
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert {"cpu", "memory"} <= set(resources["limits"])
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert f"{name}.yaml" in kustomization["resources"]


@pytest.mark.parametrize("service", registry.SERVICES, ids=lambda s: s.name)
def test_kubernetes_services_are_headless_and_scaled_horizontally(
    service: registry.Service,
) -> None:
    name = f"runops-{service.name}"
    svc = _k8s("Service", name)
    assert svc["spec"]["clusterIP"] == "None", "headless, so round_robin reaches every pod"
    grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["port"] == service.grpc_port
    hpa = _k8s("HorizontalPodAutoscaler", name)
    assert hpa["spec"]["scaleTargetRef"]["name"] == name
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in _k8s("Deployment", name)["spec"], "the HPA owns the count"
    # Every service finds the others by the Services' names.
    config = _k8s("ConfigMap", "runops-config")["data"]
    if service.target_variable in config:
        assert config[service.target_variable] == f"{name}:{service.grpc_port}"


def test_migrations_job_runs_as_the_migrations_role() -> None:
    job = _k8s("Job", "runops-migrations")
    container = job["spec"]["template"]["spec"]["containers"][0]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]}
    assert refs == {"runops-migrator-secrets"}
    secret = _k8s("Secret", "runops-migrator-secrets")["stringData"]
    assert all("runops_migrator:" in url for url in secret.values())
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
