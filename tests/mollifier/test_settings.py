"""Mollifier settings: spec defaults, and a bad value names its variable."""

from __future__ import annotations

import pytest

from runops.kit.settings import SettingsError, load_settings
from services.mollifier.settings import MollifierSettings


@pytest.fixture(autouse=True)
def _targets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNOPS_RUNSTORE_TARGET", "127.0.0.1:50052")
    monkeypatch.setenv("RUNOPS_CONTROLPLANE_TARGET", "127.0.0.1:50053")


def test_the_targets_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNOPS_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.delenv("RUNOPS_RUNSTORE_TARGET")
    with pytest.raises(SettingsError, match="RUNOPS_RUNSTORE_TARGET"):
        load_settings(MollifierSettings)


def test_defaults_follow_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNOPS_REDIS_URL", "redis://127.0.0.1:6379/0")
    settings = load_settings(MollifierSettings)
    assert (settings.gate_threshold, settings.gate_window_seconds, settings.gate_hold_seconds) == (
        100,
        0.2,
        0.5,
    )
    assert (settings.claim_ttl_min_seconds, settings.claim_ttl_max_seconds) == (5.0, 30.0)
    assert settings.drain_max_attempts == 3
    assert settings.drain_pipeline_depth == 3
    assert not settings.redis.is_cluster


def test_cluster_nodes_win_over_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNOPS_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("RUNOPS_REDIS_CLUSTER_NODES", "127.0.0.1:7000, 127.0.0.1:7001")
    settings = load_settings(MollifierSettings)
    assert settings.redis.is_cluster
    assert settings.redis.cluster_nodes == ("127.0.0.1:7000", "127.0.0.1:7001")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RUNOPS_GATE_THRESHOLD", "0"),
        ("RUNOPS_GATE_WINDOW_SECONDS", "-1"),
        ("RUNOPS_GATE_HOLD_SECONDS", "0"),
        ("RUNOPS_CLAIM_WAIT_SECONDS", "6"),
        ("RUNOPS_CLAIM_TTL_MAX_SECONDS", "1"),
        ("RUNOPS_DRAIN_BACKOFF_CAP_SECONDS", "0.01"),
        ("RUNOPS_REDIS_CLUSTER_NODES", "127.0.0.1"),
        ("RUNOPS_REDIS_URL", "http://127.0.0.1:6379"),
    ],
)
def test_a_bad_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv("RUNOPS_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings(MollifierSettings)


def test_without_redis_it_says_which_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNOPS_REDIS_URL", raising=False)
    monkeypatch.delenv("RUNOPS_REDIS_CLUSTER_NODES", raising=False)
    with pytest.raises(SettingsError, match="RUNOPS_REDIS_URL"):
        load_settings(MollifierSettings)
