"""The one exception type for mistakes a user can fix: the command line prints it as one line, exit status 2."""


class UserError(Exception):
    """Bad input (a missing file, an unknown key, a wrong value): say what is wrong and what to do."""


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; `exit_status` is 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, exit_status: int):
        super().__init__(f"interrupted (exit status {exit_status})")
        self.exit_status = exit_status


def first_line(error: BaseException, *, limit: int = 200) -> str:
    """The first line of an exception's message (at most `limit` characters), else its type's name."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
