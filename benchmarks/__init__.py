"""Benchmarks of the training engine (run ``python -m benchmarks.bench_training --help``)."""
