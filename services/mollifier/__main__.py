"""`python -m services.mollifier`: serve until SIGTERM."""

from runops.kit.server import run_service
from services.mollifier.app import build_app
from services.mollifier.settings import MollifierSettings

if __name__ == "__main__":
    run_service(MollifierSettings, build_app)
