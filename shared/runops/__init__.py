"""runops: the run-operations plane (generated contracts under runops.<service>.v1, kit in runops.kit)."""

__version__ = "0.1.0"
