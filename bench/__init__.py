"""Benchmarks (not tests): `python -m indomain.bench.sampling | training | toy [--fast] [--out PATH]`.

Each prints a table and writes JSON; every figure is a ratio against a baseline measured in
the same run.
"""
