"""The per-environment gate (spec §4): at most `threshold` triggers pass in ANY window of
`window` seconds; the first trigger refused trips the environment for `hold` seconds, during
which everything is buffered.

A sliding-window log (a sorted set of pass times, one Lua call per decision, the server's clock)
rather than the anchor's fixed window, which lets 2 x threshold through around a window edge,
and rather than GCRA / a token bucket, whose refill lets nearly 2 x threshold through in a
window that starts with a full burst. The log costs at most `threshold` members per busy
environment (100 by default) and expires when the environment goes quiet.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass

from services.mollifier.keys import EnvKeys
from services.mollifier.scripts import Scripts


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    # This call refused a trigger and started the hold (log it once per trip).
    tripped_now: bool


class Gate:
    def __init__(
        self,
        scripts: Scripts,
        *,
        prefix: str,
        threshold: int,
        window_seconds: float,
        hold_seconds: float,
    ) -> None:
        if threshold <= 0 or window_seconds <= 0 or hold_seconds <= 0:
            raise ValueError("threshold, window and hold must be positive")
        self._scripts = scripts
        self._prefix = prefix
        self.threshold = threshold
        self.window_us = max(1, round(window_seconds * 1_000_000))
        self.hold_us = max(1, round(hold_seconds * 1_000_000))
        # Members of the window log: unique across processes, cheaper than a uuid each.
        self._member_prefix = uuid.uuid4().hex[:16]
        self._members = itertools.count()

    def keys(self, environment_id: str) -> list[str]:
        """gate.lua's keys."""
        keys = EnvKeys(self._prefix, environment_id)
        return [keys.gate_window, keys.gate_hold]

    def args(self, now_us: int | None = None) -> list[object]:
        """gate.lua's arguments (a unique member for this decision's pass)."""
        return [
            self.threshold,
            self.window_us,
            self.hold_us,
            "" if now_us is None else now_us,
            f"{self._member_prefix}:{next(self._members)}",
        ]

    async def check(self, environment_id: str, *, now_us: int | None = None) -> GateDecision:
        """Pass straight through, or buffer. `now_us` replaces the server's clock (tests)."""
        passed, tripped = await self._scripts.call(
            "gate", self.keys(environment_id), self.args(now_us)
        )
        return GateDecision(bool(int(passed)), bool(int(tripped)))
