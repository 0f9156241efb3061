"""`python -m services.mollifier.drainer`: a drainer (and the stale sweeper) as its own process,
until SIGTERM; health SERVING while Redis and the run store answer."""

from runops.kit.server import run_service
from services.mollifier.drainer.app import build_drainer_app
from services.mollifier.settings import MollifierSettings

if __name__ == "__main__":
    run_service(MollifierSettings, build_drainer_app)
