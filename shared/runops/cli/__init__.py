"""The `runops` command line (entry point: runops.cli.main:main)."""
