"""The runops services, one package each: `python -m services.<name>` runs one."""
