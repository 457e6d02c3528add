"""Benchmarks: `python -m bench` (table, JSON, plot) and pytest-benchmark suites (test_*.py)."""
