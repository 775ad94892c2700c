"""Errors that reach the user as one clear line (exit code 2), never as a traceback."""

from serverless.errors import BundleError, ImageDecodeError, UnknownArchitectureError


class UserError(Exception):
    """Bad input or configuration: the message names the file or field and what was expected."""


USER_ERRORS = (UserError, BundleError, ImageDecodeError, UnknownArchitectureError)
