"""The mollifier (spec §4): the trigger front door and burst buffer. Triggers of one environment
beyond its gate wait in Redis as snapshots with their real run ids and are drained into the run
store fairly across organizations and environments. Design: docs/mollifier.md."""
