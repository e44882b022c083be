"""Benchmark plug-ins (installed as ``opdkit.benchmarks``): builders returning :class:`opdkit.eval.benchmark.Benchmark`."""

from opdkit.benchmarks import geneval as geneval
from opdkit.benchmarks import ocr as ocr
from opdkit.benchmarks import preference as preference
from opdkit.benchmarks import shapes as shapes
