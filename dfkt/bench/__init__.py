"""Benchmark suites: run (task, method, seed) grids, write results.json, report.md and plots."""
