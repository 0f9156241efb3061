"""The drainer process (`python -m services.mollifier.drainer`): no RPCs of its own, only the
kit's health, reflection and metrics, a drainer and the stale sweeper (under its lease, so
running it in several processes is harmless). Several drainer processes are safe at once
(`drainer.py`). Redis and the run store are its health dependencies: without either there is
nothing it can do.
"""

from __future__ import annotations

from dataclasses import dataclass

from runops.kit.redis import open_redis
from runops.kit.server import ServiceApp
from services.mollifier.builders import buffer_of, drainer_of, run_store_client, sweeper_of
from services.mollifier.drainer.drainer import Drainer
from services.mollifier.settings import MollifierSettings


@dataclass
class DrainerProcess:
    app: ServiceApp
    drainer: Drainer


async def build_drainer(
    settings: MollifierSettings, *, name: str = "mollifier-drainer"
) -> DrainerProcess:
    app = ServiceApp(name, settings)
    redis = await open_redis(app, "redis", settings.redis)
    run_store = run_store_client(app, settings)
    buffer = buffer_of(redis, settings)
    drainer = drainer_of(buffer, run_store, settings)
    app.add_background(drainer.worker())
    app.add_background(sweeper_of(buffer, settings).worker())
    return DrainerProcess(app, drainer)


async def build_drainer_app(settings: MollifierSettings) -> ServiceApp:
    return (await build_drainer(settings)).app
