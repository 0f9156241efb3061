"""Run-store settings (RUNOPS_* environment variables)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, TypeAdapter, ValidationInfo, field_validator, model_validator

from runops.kit.postgres import DatabaseSettings, database_field
from runops.kit.settings import ServerSettings


class RunStoreSettings(ServerSettings):
    # RUNOPS_CONTROLPLANE_DB_*: the control-plane database, home of LEGACY rows (and of every
    # row with the split off). RUNOPS_RUNOPS_DB_*: the run-ops database, home of NEW rows; not
    # read with the split off. Pools and timeouts: runops.kit.postgres.DatabaseSettings.
    controlplane_db: DatabaseSettings = database_field()
    runops_db: DatabaseSettings = database_field()
    runstore_split: bool = True
    """RUNOPS_RUNSTORE_SPLIT: new ids are minted NEW and live in the run-ops database. Off
    (single-database mode): new ids are minted LEGACY-shaped and everything lives in the
    control-plane database (spec §1)."""
    runstore_seal_timeout_seconds: float = Field(default=1800.0, ge=1, le=7 * 24 * 3600)
    """A batch still unsealed this long after its creation is aborted (SEAL_TIMEOUT) and its
    waitpoint completed with an error."""
    runstore_processing_recheck_seconds: float = Field(default=300.0, gt=0, le=7 * 24 * 3600)
    """A sealed batch still waiting on runs (PROCESSING, PARTIAL_FAILED) this long after its
    seal, and again this long after each check, is re-checked by the reaper: counts repaired
    from its runs' real states, or its waitpoint completed with an error naming the items whose
    runs were never written."""
    runstore_reaper_interval_seconds: float = Field(default=10.0, gt=0, le=3600)
    """How often each database's reaper step runs (seal timeouts, repair of cross-database
    links)."""
    runstore_reaper_lease_seconds: float = Field(default=60.0, gt=0, le=3600)
    """The reaper lease lasts this long unless renewed; must exceed the interval, so its holder
    keeps it between steps."""
    runstore_reaper_batch_size: int = Field(default=100, ge=1, le=10_000)
    """Batches aborted (and pending links re-checked) per reaper step at most."""

    runstore_expiry_interval_seconds: float = Field(default=1.0, gt=0, le=3600)
    """How often each database's TTL expiry step runs (a full step is followed by another at
    once). Its lease lasts RUNOPS_RUNSTORE_REAPER_LEASE_SECONDS, so that must exceed this too."""
    runstore_expiry_batch_size: int = Field(default=500, ge=1, le=10_000)
    """Runs expired per statement at most."""

    @model_validator(mode="before")
    @classmethod
    def _single_database(cls, data: Any) -> Any:
        # With the split off the run-ops database is not used: its variables are not required.
        if isinstance(data, dict) and not data.get("runops_db"):
            split = data.get("runstore_split", True)
            try:
                split = TypeAdapter(bool).validate_python(split)
            except ValueError:
                return data  # reported as RUNOPS_RUNSTORE_SPLIT by the field's own check
            if not split and isinstance(data.get("controlplane_db"), dict):
                data = {**data, "runops_db": data["controlplane_db"]}
        return data

    @field_validator("runstore_reaper_lease_seconds")
    @classmethod
    def _lease_outlives_interval(cls, value: float, info: ValidationInfo) -> float:
        interval = info.data.get("runstore_reaper_interval_seconds")
        if interval is not None and value <= interval:
            raise ValueError(
                f"must exceed RUNOPS_RUNSTORE_REAPER_INTERVAL_SECONDS ({interval:g}): the holder"
                " renews the lease every step"
            )
        return value

    @model_validator(mode="after")
    def _lease_outlives_expiry_interval(self) -> RunStoreSettings:
        if self.runstore_reaper_lease_seconds <= self.runstore_expiry_interval_seconds:
            raise ValueError(
                "RUNOPS_RUNSTORE_REAPER_LEASE_SECONDS must exceed"
                f" RUNOPS_RUNSTORE_EXPIRY_INTERVAL_SECONDS ({self.runstore_expiry_interval_seconds:g}):"
                " the expiry lease's holder renews it every step"
            )
        return self
