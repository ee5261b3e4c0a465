"""Exception types that carry enough context for a one-line, actionable message.

Library code raises these; only the CLI turns them into printed messages and exit codes. Each
error names the *item* (slide, file, row) and the *problem*, so a batch job can record it,
skip that item and carry on with the rest.
"""

from __future__ import annotations


class FedpathError(Exception):
    """Base class of every error fedpath raises on purpose."""


class ConfigError(FedpathError):
    """A configuration file or option is invalid."""


class ManifestError(FedpathError):
    """The slide manifest has problems; ``problems`` lists every one with its row number."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"manifest {path} has {len(self.problems)} problem(s):\n{lines}")


class SlideError(FedpathError):
    """A slide cannot be processed; the message names the slide and the reason."""

    def __init__(self, slide: str, reason: str) -> None:
        self.slide = slide
        self.reason = reason
        super().__init__(f"{slide}: {reason}")


class SlideOpenError(SlideError):
    """The file is missing, not a slide, truncated, or in a format OpenSlide cannot read."""


class MissingMppError(SlideError):
    """The slide declares no microns-per-pixel, no objective power, and no override was given."""


class SlideReadError(SlideError):
    """A region of an otherwise valid slide could not be decoded."""


class EmptyTissueError(SlideError):
    """Tissue segmentation found nothing to patch."""


class AnnotationError(FedpathError):
    """An annotation file is malformed or inconsistent with its slide."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"annotation {path}: {reason}")


class EncoderError(FedpathError):
    """An encoder is unknown, or its weights are missing or do not match."""


class FeatureBagError(FedpathError):
    """A feature-bag or coordinate file is malformed or inconsistent."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"feature file {path}: {reason}")


SITE_REPLY_ERRORS: tuple[type[BaseException], ...] = (FedpathError, ValueError, OSError)
"""What a site turns into a (redacted) error reply instead of crashing the message.

A fedpath error, bad arrays (``ValueError``) or an unreadable file (``OSError``) is the site's
problem to report; anything else is a bug, left to Flower, which reports it as a ClientApp
exception. The ClientApp and the resident worker both catch exactly these.
"""


class DeviceError(FedpathError):
    """The requested torch device is malformed or not present on this machine."""
