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


def os_error_line(err: OSError) -> str:
    """One line for an :class:`OSError` the environment caused (permissions, a file where a folder should be, a
    full disk): ``<path>: <problem>``."""
    what = err.strerror or type(err).__name__
    if err.filename is None:
        return " ".join(str(what).split())
    return " ".join(f"{err.filename}: {what}".split())


def run_command(fn, args, interrupted: str = "interrupted") -> int:
    """Run a CLI handler ``fn(args)`` the way every glam3d command reports failures.

    :class:`UserError` and environment :class:`OSError` s (permissions, a full disk) print one line ``error: …``
    and return 2; ``--debug`` (``args.debug``) re-raises them with the traceback. A closed stdout pipe (``… | head``)
    ends quietly; Ctrl-C prints ``interrupted`` and returns 130.
    """
    import os
    import sys

    debug = getattr(args, "debug", False)
    for stream in (sys.stdout, sys.stderr):  # an ASCII terminal must not crash on "±" or "—" in a table
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="backslashreplace")
    try:
        return int(fn(args) or 0)
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        if debug or not (err.filename or err.strerror):
            raise
        print(f"error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


class DiskFull(UserError):
    """A file could not be written because its filesystem is full (or the user's quota is used up); the target
    was left as it was and no temporary file remains."""
