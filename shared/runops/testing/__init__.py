"""A test-only contract (`v1/`, generated) the kit's own tests serve; no service implements it."""
