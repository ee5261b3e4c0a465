"""The benchmarks, one module each, run from the repository root as ``python -m bench.<name>``.

What each measures, how to read it and the recorded results are in ``bench/README.md``.
"""
