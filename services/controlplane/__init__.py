"""The control-plane service: organizations, projects, environments, API keys, workers, flags
(spec §2), cached reads from the replica with invalidation pushed to every consumer."""
