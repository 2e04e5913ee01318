"""Errors that are the user's to fix: printed as one line, exit status 2."""


class UserError(Exception):
    """Bad input (job spec, data, storage, address): the message says what, where and the fix."""
