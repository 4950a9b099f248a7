"""What the `deit` command prints when something goes wrong, and the library's log lines.

An error in what the user gave is one line in the CLI's terms (`user_message`): a setting the
library names (`optim.base_lr`) is shown as its flag (`--optim.base-lr`), a config file's key as
written there. `USER_ERRORS` are those; anything else is a bug, printed with its traceback by
`cli.main`. A full disk is one line too, with Orbax's writer threads kept quiet after it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

from deit.errors import InputError


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (tests and notebooks swap it), with the
    settings a message names shown as their flags."""

    def format(self, record: logging.LogRecord) -> str:
        return as_flags(super().format(record))

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


@contextlib.contextmanager
def library_messages() -> Iterator[None]:
    """The library's `logging.getLogger("deit")` messages on stderr while a command runs."""
    logger = logging.getLogger("deit")
    handler, level, propagate = StderrHandler(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def quiet_background_writers() -> None:
    """After a full disk, Orbax's writer threads still fail on their own (asyncio's "exception
    was never retrieved", "Event loop is closed" from threads): the same error, already named in
    the one line the user gets, so their reports are dropped for the rest of the `deit`
    process (it is about to exit); `--debug` keeps them."""
    import threading

    logging.getLogger("asyncio").disabled = True
    threading.excepthook = lambda args: None
    sys.excepthook = lambda *args: None  # what C++ threads' callbacks print through


def report_no_space(command: str, err: BaseException, quiet: bool) -> int:
    """The full-disk line, exit 2. Orbax's writer threads may be printing their own failures
    onto stderr meanwhile, so the line is one write that starts a line of its own, and with
    `quiet` the threads' later reports are dropped (`quiet_background_writers`)."""
    if quiet:
        quiet_background_writers()
    sys.stderr.write(f"\ndeit {command}: error: {user_message(err)}\n")
    sys.stderr.flush()
    return 2


# Input the user can fix: one line, exit 2. Anything else is a bug in deit: its traceback.
USER_ERRORS = (
    InputError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


# A setting named in a library message (`optim.base_lr`) is shown as its flag (`--optim.base-lr`).
_SETTING = re.compile(
    r"(?<![\w./-])(?:model|data|mixup|erasing|loss|optim|ema|teacher|parallel)(?:\.[a-z_]+)+\b"
)

# The run's own settings (`TrainConfig`'s top level) that messages name.
_TOP_SETTING = re.compile(
    r"(?<![\w./-])(?:batch_size|log_every|checkpoint_every|keep_checkpoints)\b"
)


def _settings() -> set[str]:
    """Every dotted path of the config tree (`optim.base_lr`, ...): what may become a flag."""
    import dataclasses
    import typing

    from deit.configs import TrainConfig

    out, todo = set(), [(TrainConfig, "")]
    while todo:
        cls, prefix = todo.pop()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                todo.append((hints[f.name], f"{prefix}{f.name}."))
            else:
                out.add(prefix + f.name)
    return out


def user_message(err: BaseException) -> str:
    """The error in the CLI's terms: settings named by their flags."""
    if getattr(err, "source", None):  # a config file's key: named as written in the file
        return str(err)
    key = getattr(err, "key", None)  # a configs.ConfigError: the setting's dotted path
    if isinstance(key, str) and "." in key:
        return f"--{key.replace('_', '-')} {err.message}"
    if isinstance(err, OSError) and err.filename and str(err.filename) not in str(err.strerror):
        return f"{err.strerror}: {err.filename}"
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return as_flags(text)


def as_flags(text: str) -> str:
    """A library message with the settings it names (`optim.base_lr`) as their flags."""
    flag = lambda m: "--" + m[0].replace("_", "-") if m[0] in _settings() else m[0]
    text = _SETTING.sub(flag, text)
    text = _TOP_SETTING.sub(lambda m: "--" + m[0].replace("_", "-"), text)
    for words, flags in (
        ("resume it", "resume it (--resume)"),
        ("resume the run", "resume the run (--resume)"),
        ("another output folder", "another --output"),
        ("without resume", "without --resume"),
    ):
        text = text.replace(words, flags)
    return text
