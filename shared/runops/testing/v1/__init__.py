"""Generated from protos/ by `python -m runops.codegen`; do not edit."""
