"""The buffer's Lua scripts (`lua/*.lua`), read once and called by SHA.

redis-py's `register_script` sends EVALSHA and, on NOSCRIPT (a restarted server, a Cluster node
that never saw the script), loads it and calls again; in a Cluster the call goes to the node
owning its keys' slot. Every script touches the keys of one environment (one hash tag), or one
key of its own; see docs/mollifier.md.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from redis.commands.core import AsyncScript

from runops.kit.redis import RedisClient

LUA = Path(__file__).with_name("lua")
NAMES = (
    "accept", "pop", "finish", "requeue", "recover", "mutate", "lookup", "reset_key", "stats",
    "count_older", "size", "gate", "claim", "publish", "release", "lease",
)  # fmt: skip
_SOURCES = {name: (LUA / f"{name}.lua").read_text() for name in NAMES}


def _function(name: str) -> str:
    """Script `name` as a local Lua function of (KEYS, ARGV), for a script that composes it."""
    return f"local function {name}(KEYS, ARGV)\n{_SOURCES[name]}end\n"


# The gate and the buffer write in one call: their own scripts, composed (not copied).
_SOURCES["trigger"] = _function("gate") + _function("accept") + (LUA / "trigger.lua").read_text()


class Scripts:
    """Every script, registered on one client. At most `max_in_flight` calls at once: redis-py's
    Cluster client fails a command with MaxConnectionsError when a node's pool is exhausted
    (the standalone pool waits), and a burst aims at one environment, hence one node."""

    def __init__(self, client: RedisClient, max_in_flight: int = 100) -> None:
        self._scripts = {name: client.register_script(src) for name, src in _SOURCES.items()}
        self._in_flight = asyncio.Semaphore(max_in_flight)

    async def call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script: AsyncScript = self._scripts[name]
        async with self._in_flight:
            return await script(keys=keys, args=args)
