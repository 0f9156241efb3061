"""Client helpers other services use to call runops services."""
