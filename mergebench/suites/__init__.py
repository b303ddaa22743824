"""Benchmark suites: the built-in micro suite and the paper's real task configs."""
