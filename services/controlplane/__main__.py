"""`python -m services.controlplane`: serve until SIGTERM."""

from runops.kit.server import run_service
from services.controlplane.app import build_app
from services.controlplane.settings import ControlPlaneSettings

if __name__ == "__main__":
    run_service(ControlPlaneSettings, build_app)
