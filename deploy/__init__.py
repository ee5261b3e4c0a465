"""How fedpath is run: the one ``fedpath`` command, the demo, the local network of real
Flower processes, the in-process grid and the simulation.

The only package that may import both sides (``fedpath.client`` and ``fedpath.server``).
"""
