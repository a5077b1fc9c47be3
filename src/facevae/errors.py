"""The one exception type for mistakes a user can fix: the command line prints it as one line, exit status 2."""


class UserError(Exception):
    """Bad input (a missing file, an unknown key, a wrong value): say what is wrong and what to do."""


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; `exit_status` is 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, exit_status: int):
        super().__init__(f"interrupted (exit status {exit_status})")
        self.exit_status = exit_status
