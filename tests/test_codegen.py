"""The committed generated code matches the protos (regenerate with `runops protos`)."""

from __future__ import annotations

from runops.codegen import stale_files


def test_generated_code_is_fresh() -> None:
    problems = stale_files()
    assert problems == [], "\n".join(problems) + "\nrun `runops protos` and commit the result"


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
