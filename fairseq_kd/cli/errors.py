"""The plugin's command-line convention, shared by every ``fairseq-kd-*`` command.

Each command's ``main`` parses its arguments and hands the work to :func:`run_command`, which sets
up logging (:func:`setup_logging`) and runs it. A problem the user can fix (a bad flag, a missing
or foreign file) is raised as :class:`UserError` with a message that names the file or flag and
says what to do; :func:`run_command` turns it into one line on stderr and exit status 2, never a
traceback. Anything else is a bug and keeps its traceback.
"""

import logging
import os
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """Bad input the user can fix; the message names the file or flag and the fix."""


def setup_logging() -> None:
    """fairseq's log format on stdout, level from ``$LOGLEVEL``; ``force`` because fairseq's imports
    may already have configured the root logger."""
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        level=os.environ.get("LOGLEVEL", "INFO").upper(),
        stream=sys.stdout,
        force=True,
    )


def run_command(prog: str, command: Callable[[], T]) -> T:
    """:func:`setup_logging`, then run ``command``; a :class:`UserError` ends the process with
    ``prog: error: ...`` and status 2."""
    setup_logging()
    try:
        return command()
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
