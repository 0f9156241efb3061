"""Benchmarks (spec §7): each prints its figure beside a raw floor measured in the same run."""
