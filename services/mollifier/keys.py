"""Redis key names. Everything of one environment shares the hash tag `{<prefix>:<env id>}`, so
it lives in one Redis Cluster slot and every buffer script runs on one node. Only the index of
active environments and the sweep lease live elsewhere (`{<prefix>}`), and no script touches
them together with an environment's keys."""

from __future__ import annotations

from dataclasses import dataclass


def _scoped(task_identifier: str, key: str) -> str:
    # Length-prefixed: a ':' inside the task identifier cannot make two pairs collide.
    return f"{len(task_identifier)}:{task_identifier}:{key}"


@dataclass(frozen=True)
class EnvKeys:
    """The keys of one environment."""

    prefix: str
    environment_id: str

    @property
    def tag(self) -> str:
        return f"{{{self.prefix}:{self.environment_id}}}"

    @property
    def queue(self) -> str:
        """LIST of QUEUED run ids, oldest (and requeued) at the front."""
        return f"{self.tag}:q"

    @property
    def draining(self) -> str:
        """ZSET of DRAINING run ids scored by draining-since ms (the visibility timeout)."""
        return f"{self.tag}:d"

    @property
    def entry_prefix(self) -> str:
        return f"{self.tag}:e:"

    def entry(self, run_id: str) -> str:
        """HASH: the snapshot and its bookkeeping (runops.mollifier.entries)."""
        return self.entry_prefix + run_id

    def lookup(self, task_identifier: str, key: str) -> str:
        """STRING: the run id of the buffered run holding an idempotency key."""
        return f"{self.tag}:i:{_scoped(task_identifier, key)}"

    def claim(self, task_identifier: str, key: str) -> str:
        """HASH: an idempotency claim (t = owner token, r = published run id, x = key expiry)."""
        return f"{self.tag}:c:{_scoped(task_identifier, key)}"

    @property
    def gate_window(self) -> str:
        """ZSET: pass times (us) within the gate's window."""
        return f"{self.tag}:g"

    @property
    def gate_hold(self) -> str:
        """STRING: held-tripped-until time (us)."""
        return f"{self.tag}:gh"


@dataclass(frozen=True)
class GlobalKeys:
    prefix: str

    @property
    def environments(self) -> str:
        """HASH environment id -> organization id: environments that may hold entries."""
        return f"{{{self.prefix}}}:envs"

    @property
    def sweep_lease(self) -> str:
        return f"{{{self.prefix}}}:lease:sweep"
