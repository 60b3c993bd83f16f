"""The one error type for problems a user can fix (bad input, missing nodes, bad files)."""


class UserError(Exception):
    """Raised for anything the user can fix; `farm` turns it into a message and exit code 2."""
