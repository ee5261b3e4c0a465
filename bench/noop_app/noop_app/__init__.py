"""No-op Flower app: Flower's messaging floor for ``bench/federation.py``."""
