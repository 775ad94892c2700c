"""Every error that reaches a person as one clear line: CLI exit code 2, HTTP 4xx from the function.

Kept free of heavy imports so that ``trainer``'s CLI can name them without loading torch.
"""


class ImageDecodeError(ValueError):
    """The bytes are not an image we can read, or the image is too large."""


class BundleError(ValueError):
    """A bundle directory is missing, incomplete or of an unknown format."""


class UnknownArchitectureError(ValueError):
    """An architecture name that is not registered."""


class DeviceError(ValueError):
    """A device was asked for that this machine does not have (e.g. cuda without a GPU)."""


class UserError(Exception):
    """Bad input or configuration: the message names the file or field and what was expected."""


#: What the CLI prints as ``error: <message>`` with exit code 2 instead of a traceback.
USER_ERRORS = (UserError, BundleError, ImageDecodeError, UnknownArchitectureError, DeviceError)
