"""Wording for files that torch's weights-only loader refuses.

fedpath loads every checkpoint and weight file with ``torch.load(weights_only=True)``. When
that refuses a file, torch's message advises re-running with ``weights_only=False``: the one
thing a hospital must never do with a file it did not make. Our messages name what the file
references instead, so the user learns what is in it without being pointed at the unsafe path.
"""

from __future__ import annotations

import pickle
import re

__all__ = ["pickled_reference"]

_PICKLED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
"""How torch's weights-only unpickler names the callable a refused file references."""


def pickled_reference(exc: pickle.UnpicklingError) -> str:
    """`` (it references module.name)`` for the refused callable, or "" when torch names none."""
    found = _PICKLED_GLOBAL.search(str(exc))
    return f" (it references {found.group(1)})" if found else ""
