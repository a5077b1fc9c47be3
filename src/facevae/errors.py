"""The one exception type for mistakes a user can fix: the command line prints it as one line, exit status 2."""


class UserError(Exception):
    """Bad input (a missing file, an unknown key, a wrong value): say what is wrong and what to do."""
