"""The committed generated code matches the protos (regenerate with `runops protos`)."""

from __future__ import annotations

import os
import subprocess
import sys

from runops.localstack.services import python_path


def test_generated_code_is_fresh() -> None:
    # protoc runs in a process of its own: in-process, its C++ side once aborted the whole
    # test session (SIGABRT) late in a full run, next to grpc's threads.
    env = {**os.environ, "PYTHONPATH": python_path()}
    done = subprocess.run(
        [sys.executable, "-m", "runops.codegen", "--check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (
        done.stdout + done.stderr + "\nrun `runops protos` and commit the result"
    )


def test_generated_code_is_importable_by_proto_package() -> None:
    from runops.common.v1 import common_pb2
    from runops.controlplane.v1 import controlplane_pb2
    from runops.ingest.v1 import ingest_pb2
    from runops.mollifier.v1 import mollifier_pb2
    from runops.runstore.v1 import runstore_pb2

    assert common_pb2.Residency.Name(common_pb2.RESIDENCY_NEW) == "RESIDENCY_NEW"
    services = {
        service.full_name
        for module in (controlplane_pb2, ingest_pb2, mollifier_pb2, runstore_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
    }
    assert services == {
        "runops.controlplane.v1.ControlPlaneService",
        "runops.ingest.v1.BatchIngestService",
        "runops.mollifier.v1.MollifierService",
        "runops.runstore.v1.RunStoreService",
    }
