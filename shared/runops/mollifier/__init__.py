"""The mollifier's contract (`v1/`, generated) and, beside it, its client side."""
