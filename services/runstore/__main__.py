"""`python -m services.runstore`: serve until SIGTERM."""

from runops.kit.server import run_service
from services.runstore.app import build_app
from services.runstore.settings import RunStoreSettings

if __name__ == "__main__":
    run_service(RunStoreSettings, build_app)
