"""Benchmarks run as `pipenag bench NAME` (see pipenag.cli.BENCHES)."""
