"""Benchmarks (not tests) and their fixtures. The scripts run as ``python bench/NAME.py`` and import their
siblings (``_common``, ``trained``) from this folder; tests import the fixtures as ``bench.trained``."""
