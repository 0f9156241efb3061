"""The benchmarks of spec §7 (`runops bench`; each module also runs alone:
`python -m runops.bench.<name>`). Installed with the package, so a deployment can be measured
without a checkout; their smoke tests live in tests/<service>/test_benchmark_smoke.py."""
