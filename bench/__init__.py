"""Benchmarks: consulate measured side by side with the direct path and its peers.

A package (not loose scripts) so that ``python -m bench.tcp`` and the helper
modules share imports; results land in ``bench/results/``.
"""
