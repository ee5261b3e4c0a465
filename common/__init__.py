"""Code shared by the hospital side (``client``) and the coordinator side (``server``).

Nothing here talks to Flower's client or server machinery: it is the vocabulary both sides
must agree on (configs, the feature-bag format, hashing, errors).
"""

__version__ = "0.1.0"
