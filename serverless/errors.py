"""Errors of the runtime that callers turn into clear messages (CLI exit 2, HTTP 4xx).

Kept free of heavy imports so that ``trainer``'s CLI can name them without loading torch.
"""


class ImageDecodeError(ValueError):
    """The bytes are not an image we can read, or the image is too large."""


class BundleError(ValueError):
    """A bundle directory is missing, incomplete or of an unknown format."""


class UnknownArchitectureError(ValueError):
    """An architecture name that is not registered."""
