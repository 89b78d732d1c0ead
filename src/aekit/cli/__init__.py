"""The ``aekit`` command: a thin layer over the library.

Every command is a library call; this package only parses arguments (:mod:`.parser`),
prints results (:mod:`.commands`) and turns what goes wrong into one line on stderr
(:mod:`.messages`):

- a user error (a bad flag, ``ValueError``, a missing file): ``aekit: error: ...``, exit 2;
- a Python warning raised during a command: ``aekit: warning: ...``, and the command goes on;
- the library's messages name its parameters (``overwrite=True``, ``resize=(H, W)``); the
  CLI prints them as the flags that set them (``--overwrite``, ``--resize H W``), see
  :func:`as_flags`;
- a reader of the output that went away (``aekit data info X | head -1``): nothing more
  is printed, exit 141, as for a Unix tool killed by SIGPIPE;
- anything else is a bug in aekit: one line saying so, exit 1 (``AEKIT_TRACEBACK=1``
  prints the traceback as well).

Called from Python, :func:`main` leaves the ``aekit`` logger and the warning filters as it
found them.
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings

from aekit._io import WriteError
from aekit.cli.commands import COMMANDS, _tune_process
from aekit.cli.messages import (EXIT_INTERRUPTED, _closed_output, _error, _internal_error, _logging_to_stderr,
                                _show_warning, as_flags)
from aekit.cli.parser import UsageError, build_parser

__all__ = ["main", "parse_args", "build_parser", "as_flags", "COMMANDS", "UsageError"]


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as exc:
        return _error(str(exc))
    command = getattr(args, "data_command", None) or args.command
    _tune_process(args.command)
    try:
        # Both restore the caller's settings afterwards (main may be called from Python).
        with _logging_to_stderr(), warnings.catch_warnings():
            warnings.showwarning = functools.partial(_show_warning, command=command)
            code = COMMANDS[args.command](args)
            sys.stdout.flush()  # a reader gone away shows here, not in Python's flush at exit
            return code
    except BrokenPipeError:
        return _closed_output()
    except KeyboardInterrupt:
        print("aekit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, WriteError, FileNotFoundError, PermissionError, IsADirectoryError,
            NotADirectoryError) as exc:
        return _error(as_flags(str(exc), command))
    except Exception as exc:  # a bug: say so in one line, the traceback on request
        return _internal_error(exc)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; :class:`UsageError` for one argparse refuses."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # argparse would blame the top-level parser; name the command instead
        command = " ".join(filter(None, ("aekit", args.command, getattr(args, "data_command", None))))
        hint = ""
        if "--data" in unknown and hasattr(args, "input"):  # score and denoise; train and the others take --data
            hint = f"; {command} takes its images as INPUT, the argument after RUN: drop --data"
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}{hint}; see `{command} --help`")
    return args

