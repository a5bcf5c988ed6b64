"""Benchmarks: they state the machine, the versions, the repeats and the config."""
