"""Benchmarks that drive a real `python -m service` process (not part of the test suite)."""
