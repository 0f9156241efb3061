"""The run store's contract (`v1/`, generated) and, beside it, its client side."""
