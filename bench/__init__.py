"""Benchmarks for Tandem: a gRPC load client, HF baselines, metrics and plots.

Run ``python -m bench --help``. The serving client (:mod:`bench.serving`) talks gRPC only and
never imports torch; :mod:`bench.baselines` imports torch and transformers when it runs.
"""
