"""Synthetic hospitals: slide pyramids with known tumour, and ready-made feature-bag sites.

No hospital runs this: it feeds the demo, the simulation, the tests and the benchmarks with
cohorts whose ground truth is known. It writes the formats the hospital side reads, so it may
import ``fedpath.client`` (never ``fedpath.server``).
"""
