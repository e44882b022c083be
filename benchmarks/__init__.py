"""Benchmark plug-ins (installed as ``opdkit.benchmarks``): builders returning :class:`opdkit.benchmark.Benchmark`."""

from opdkit.benchmarks import shapes as shapes
