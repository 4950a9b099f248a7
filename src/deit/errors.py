"""The exception the library raises for input it cannot use (a setting, a file, a folder).

`InputError` is a `ValueError`, so callers that catch `ValueError` keep working; the CLI prints it
as one line with exit 2, and reports any other exception as a bug with its traceback.
"""


class InputError(ValueError):
    """The input (a setting, a file, a folder, an array) is not what the library expected."""


class NoSpaceError(InputError):
    """A write (a checkpoint, an exported model) did not fit on its filesystem: what the user
    fixes by freeing space, then resuming. The message names the folder and the bytes needed."""
