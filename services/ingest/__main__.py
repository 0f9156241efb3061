"""`python -m services.ingest`: serve until SIGTERM."""

from runops.kit.server import run_service
from services.ingest.app import build_app
from services.ingest.settings import IngestSettings

if __name__ == "__main__":
    run_service(IngestSettings, build_app)
