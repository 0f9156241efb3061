"""An S3-compatible endpoint from moto's server, run as a subprocess, plus bucket creation."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from runops.localstack.ports import HOST, free_port, is_listening
from runops.localstack.process import LocalServer, StackError

DEFAULT_BUCKET = "runops-packets"
REGION = "us-east-1"
# moto accepts any credentials; these are what the stack hands to services and tests.
ACCESS_KEY_ID = "runops-local"
SECRET_ACCESS_KEY = "runops-local-secret"


def ensure_bucket(endpoint_url: str, bucket: str, region: str = REGION) -> None:
    """Create the bucket unless it already exists (idempotent; fine on a shared server)."""
    import botocore.session
    from botocore.exceptions import ClientError

    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
    )
    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in (
            "BucketAlreadyOwnedByYou",
            "BucketAlreadyExists",
        ):
            raise
    finally:
        client.close()


class S3Server(LocalServer):
    """moto's S3 server on a free loopback port, with the default bucket created."""

    def __init__(self, state_dir: Path, bucket: str = DEFAULT_BUCKET) -> None:
        if len(bucket) < 3:
            raise ValueError(f"S3 bucket names need at least 3 characters, got {bucket!r}")
        super().__init__(state_dir / "s3")
        self.port = free_port()
        self.bucket = bucket

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 30) -> None:
        try:
            import moto.server  # noqa: F401
        except ImportError:
            raise StackError("moto's server is not installed: pip install 'moto[server]'") from None
        cmd = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._start(
            cmd,
            self._dir / "moto.log",
            lambda: is_listening(self.port),
            f"moto server on port {self.port}",
            timeout=timeout,
            env=env,
        )
        ensure_bucket(self.endpoint_url, self.bucket)
