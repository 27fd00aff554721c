"""Benchmarks and locust scenarios for modelplane; locust itself only ever runs in a subprocess."""
