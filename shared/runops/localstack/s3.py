"""An S3-compatible endpoint from moto's server, run as a subprocess, plus bucket creation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from runops.localstack.ports import HOST, free_port, is_listening
from runops.localstack.process import StackError, log_tail, spawn, terminate

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


class S3Server:
    """moto's S3 server on a free loopback port, with the default bucket created."""

    def __init__(self, state_dir: Path, bucket: str = DEFAULT_BUCKET) -> None:
        if len(bucket) < 3:
            raise ValueError(f"S3 bucket names need at least 3 characters, got {bucket!r}")
        self.port = free_port()
        self.bucket = bucket
        self._dir = state_dir / "s3"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 30) -> None:
        try:
            import moto.server  # noqa: F401
        except ImportError:
            raise StackError("moto's server is not installed: pip install 'moto[server]'") from None
        self._dir.mkdir(parents=True, exist_ok=True)
        log = self._dir / "moto.log"
        cmd = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._proc = spawn(cmd, log, cwd=self._dir, env=env)
        deadline = time.monotonic() + timeout
        while not is_listening(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"moto server did not start on {self.port}:\n{log_tail(log)}")
            time.sleep(0.05)
        ensure_bucket(self.endpoint_url, self.bucket)

    def stop(self, keep_files: bool = False) -> None:
        if self._proc is not None:
            terminate(self._proc)
            self._proc = None
        if not keep_files:
            shutil.rmtree(self._dir, ignore_errors=True)
