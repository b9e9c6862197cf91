"""Errors meant for the user rather than for a traceback."""


class UserError(Exception):
    """A problem with the user's input: shown as one line, exit status 2."""
