"""User-facing errors.

Anything a user can cause (a bad file, a bad argument, a bad config) raises :class:`UserError` with a one-line
message that names the file or option and the problem. The CLIs print ``error: <message>`` and exit with code 2
(a traceback only with ``--debug``).
"""


class UserError(Exception):
    """A problem with the user's input; ``str(err)`` is one line naming the file/option and the problem."""

    def __init__(self, message: str, path=None):
        message = " ".join(str(message).split())  # always one line
        if path is not None:
            message = f"{path}: {message}"
        super().__init__(message)
        self.path = path
