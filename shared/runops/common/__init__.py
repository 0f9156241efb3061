"""Types every runops contract shares (`v1/`: generated from protos/runops/common/v1)."""
