"""IngestSettings: defaults from the spec, every bad value refused naming its variable (what
`run_service` prints before exiting 2), read from the real environment variables."""

from __future__ import annotations

import os

import pytest

from runops.kit.settings import ServerSettings, SettingsError, load_settings
from services.ingest.settings import IngestSettings

REQUIRED = {
    "RUNOPS_S3_BUCKET": "runops-packets",
    "RUNOPS_REDIS_URL": "redis://127.0.0.1:6379/0",
    "RUNOPS_CONTROLPLANE_TARGET": "127.0.0.1:50051",
    "RUNOPS_RUNSTORE_TARGET": "127.0.0.1:50052",
    "RUNOPS_MOLLIFIER_TARGET": "127.0.0.1:50053",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("RUNOPS_"):
            monkeypatch.delenv(name)
    for name, value in REQUIRED.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def refusal(env: pytest.MonkeyPatch, **variables: str) -> str:
    for name, value in variables.items():
        env.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings(IngestSettings)
    return str(info.value)


def test_defaults_are_the_specs(env: pytest.MonkeyPatch) -> None:
    settings = load_settings(IngestSettings)
    assert settings.ingest_concurrency == 10
    assert settings.max_run_count == 100_000
    assert settings.max_item_payload_bytes == 3 * 1024 * 1024
    assert settings.offload_threshold_bytes == 512 * 1024
    assert settings.s3_bucket == "runops-packets"
    assert settings.s3_endpoint_url is None
    assert settings.redis.url == "redis://127.0.0.1:6379/0"
    assert not settings.redis.is_cluster
    assert settings.mollifier_target == "127.0.0.1:50053"
    # Every ingest field documents itself (what docs/ingest.md lists).
    own = set(IngestSettings.model_fields) - set(ServerSettings.model_fields)
    assert own
    assert all(IngestSettings.model_fields[name].description for name in own)


def test_variables_are_read(env: pytest.MonkeyPatch) -> None:
    env.setenv("RUNOPS_INGEST_CONCURRENCY", "1")
    env.setenv("RUNOPS_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    env.setenv("RUNOPS_REDIS_CLUSTER_NODES", "127.0.0.1:7000, 127.0.0.1:7001")
    settings = load_settings(IngestSettings)
    assert settings.ingest_concurrency == 1
    assert settings.s3_endpoint_url == "http://127.0.0.1:9000"
    assert settings.redis.cluster_nodes == ("127.0.0.1:7000", "127.0.0.1:7001")


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"RUNOPS_INGEST_CONCURRENCY": "0"}, "RUNOPS_INGEST_CONCURRENCY: Input should be greater"),
        (
            {"RUNOPS_INGEST_CONCURRENCY": "ten"},
            "RUNOPS_INGEST_CONCURRENCY: Input should be a valid",
        ),
        ({"RUNOPS_MAX_RUN_COUNT": "0"}, "RUNOPS_MAX_RUN_COUNT: Input should be greater"),
        # Above the run store's limit, every batch that large would be refused there.
        ({"RUNOPS_MAX_RUN_COUNT": "1000001"}, "RUNOPS_MAX_RUN_COUNT: Input should be less"),
        ({"RUNOPS_S3_BUCKET": "ab"}, "RUNOPS_S3_BUCKET: String should match pattern"),
        ({"RUNOPS_S3_ENDPOINT_URL": "ftp://x"}, "RUNOPS_S3_ENDPOINT_URL: String should match"),
        ({"RUNOPS_REDIS_URL": "http://x"}, "RUNOPS_REDIS_URL: Value error, must be a redis://"),
        ({"RUNOPS_REDIS_CLUSTER_NODES": "a:1,b"}, "RUNOPS_REDIS_CLUSTER_NODES: Value error, each"),
        ({"RUNOPS_MOLLIFIER_TARGET": "a b:1"}, "RUNOPS_MOLLIFIER_TARGET: String should match"),
        (
            {"RUNOPS_OFFLOAD_THRESHOLD_BYTES": str(4 * 1024 * 1024)},
            "RUNOPS_OFFLOAD_THRESHOLD_BYTES: Value error, must not exceed "
            "RUNOPS_MAX_ITEM_PAYLOAD_BYTES (3145728)",
        ),
        (
            {"RUNOPS_MAX_CHUNK_BYTES": str(32 * 1024 * 1024)},
            "RUNOPS_MAX_CHUNK_BYTES: Value error, must not exceed RUNOPS_MAX_MESSAGE_BYTES",
        ),
        (
            {"RUNOPS_MAX_ITEM_PAYLOAD_BYTES": str(16 * 1024 * 1024)},
            "RUNOPS_MAX_ITEM_PAYLOAD_BYTES: Value error, must be less than "
            "RUNOPS_MAX_MESSAGE_BYTES (16777216)",
        ),
        (
            {"RUNOPS_MAX_MESSAGE_BYTES": str(2 * 1024 * 1024)},
            "RUNOPS_MAX_ITEM_PAYLOAD_BYTES: Value error, must be less than "
            "RUNOPS_MAX_MESSAGE_BYTES (2097152)",
        ),
        (
            {"RUNOPS_RATE_LIMIT_CAPACITY": "1000"},
            "RUNOPS_RATE_LIMIT_CAPACITY: Value error, must be at least RUNOPS_MAX_RUN_COUNT",
        ),
        (
            {"RUNOPS_S3_RETRY_BASE_SECONDS": "3", "RUNOPS_S3_RETRY_CAP_SECONDS": "1"},
            "RUNOPS_S3_RETRY_CAP_SECONDS: Value error, must be at least",
        ),
    ],
)
def test_bad_values_name_the_variable(
    env: pytest.MonkeyPatch, variables: dict[str, str], expected: str
) -> None:
    assert expected in refusal(env, **variables)


def test_missing_required_variables_are_each_named(env: pytest.MonkeyPatch) -> None:
    for name in REQUIRED:
        env.delenv(name)
    message = refusal(env)
    for name in (
        "RUNOPS_S3_BUCKET: Field required",
        "RUNOPS_CONTROLPLANE_TARGET: Field required",
        "RUNOPS_RUNSTORE_TARGET: Field required",
        "RUNOPS_MOLLIFIER_TARGET: Field required",
        "set RUNOPS_REDIS_URL (standalone) or RUNOPS_REDIS_CLUSTER_NODES",
    ):
        assert name in message
    assert message.endswith("fix the environment variables above and start again")
