"""What the ``aekit`` command prints besides results: one line on stderr per error or
warning, library parameters named as the flags that set them (:func:`as_flags`), a
reader gone away (:func:`_closed_output`), and the ``aekit`` logger on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import re
import sys
import traceback

from aekit.cli.parser import build_parser

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_CLOSED_OUTPUT = 128 + 13  # 141: what a shell reports for a command killed by SIGPIPE (13)
TRACEBACK_ENV = "AEKIT_TRACEBACK"  # set to 1 to see the traceback of an internal error
BUG_REPORTS = "the aekit issue tracker"


# ------------------------------------------------------- library parameters as flags

# A library parameter and its value as aekit's messages write them: ``overwrite=True``,
# ``device="cpu"``, ``resize=(H, W)``, ``epochs=N``, optionally after "pass ".
_PARAMETER = re.compile(r"""(?P<passed>\bpass )?(?<![\w.-])(?P<name>[a-z][a-z0-9_]*)="""
                        r"""(?P<value>"[^"]*"|'[^']*'|\([^()]*\)|[\w.:+-]*\w)""")


def as_flags(text: str, command: str | None = None) -> str:
    """A library message as the command line says it: each ``name=value`` whose ``name`` is
    an option's destination in :func:`build_parser` becomes that option (``command``'s own
    first, then ``train``'s), and other text is left alone:

    - ``overwrite=True`` -> ``--overwrite``, ``device="cpu"`` -> ``--device cpu``,
      ``epochs=3`` -> ``--epochs 3``;
    - ``resize=(28, 28)`` -> ``--resize 28 28`` (an option of several values), ``latent_dims=(2,
      8)`` -> ``--latent-dims 2,8`` (one comma-separated value);
    - ``pass stream=False`` -> ``drop --stream``; elsewhere ``stream=False`` or ``patience=None``
      -> ``no --stream``, ``no --patience``;
    - the library method of the command's own name: ``sample() needs ...`` -> ``aekit sample needs ...``.
    """
    options = _options(command)
    if command is not None:
        text = re.sub(rf"(?<![\w.]){re.escape(command)}\(\)", f"aekit {command}", text)

    def flag(found: re.Match) -> str:
        action = options.get(found["name"])
        if action is None:
            return found[0]
        value = _literal(found["value"])
        if found["passed"] and (value is False or value is None):
            return f"drop {_as_flag(action)}"
        return (found["passed"] or "") + _as_flag(action, value)

    return _PARAMETER.sub(flag, text)


def _literal(text: str) -> object:
    """A value as a message writes it: True/False/None, a quoted string, a tuple of items
    (placeholders such as H kept), or the text itself (numbers keep their spelling)."""
    if text[0] in "\"'":
        return text[1:-1]
    if text[0] == "(":
        return tuple(item.strip().strip("\"'") for item in text[1:-1].split(",") if item.strip())
    return {"True": True, "False": False, "None": None}.get(text, text)


def _as_flag(action: argparse.Action, value: object = True) -> str:
    """How the command line spells ``dest=value``: ``--batch-size 32``, ``--resize 14 14``,
    ``--widths 8,16``, ``--stream``, ``no --patience``."""
    flag = max(action.option_strings, key=len)
    if value is None or value is False:
        return f"no {flag}"
    if value is True and action.nargs == 0:
        return flag
    if isinstance(value, (tuple, list)):
        return f"{flag} {(',' if action.nargs is None else ' ').join(map(str, value))}"
    return f"{flag} {value}"


@functools.cache
def _options(command: str | None = None) -> dict[str, argparse.Action]:
    """Option destinations (the library's parameter names) -> the option that sets them:
    ``command``'s own, then ``train``'s (a message about a run may say how to train it:
    ``resume=True`` while evaluating an unfinished run)."""
    commands = _subcommands(build_parser())
    options: dict[str, argparse.Action] = {}
    for parser in filter(None, (commands.get(command), commands["train"])):
        for action in parser._actions:
            if action.option_strings and action.dest not in ("help", "version"):
                options.setdefault(action.dest, action)
    return options


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by name, nested ones (``data info``) included."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update(_subcommands(sub))
    return found


@contextlib.contextmanager
def _logging_to_stderr():
    """The ``aekit`` logger's INFO messages as ``aekit: ...`` lines on stderr, for the length
    of a command; its handlers, level and propagation as they were afterwards."""
    logger = logging.getLogger("aekit")
    saved = logger.handlers[:], logger.level, logger.propagate
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("aekit: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers[:], level, logger.propagate = saved
        logger.setLevel(level)


def _closed_output() -> int:
    """The reader of the output went away (``aekit data info X | head -1``): stop quietly,
    as Unix tools do, with the status of a command killed by SIGPIPE. Where stdout is the
    closed one, what is still buffered for it goes to /dev/null, so that Python's flush at
    exit does not fail again (Python's docs, "Note on SIGPIPE"); a stdout that still takes
    output (the closed one was stderr) is left as it is."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        with contextlib.suppress(AttributeError, ValueError, OSError):  # no file descriptor: nothing to redirect
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
    except (OSError, ValueError):  # a stdout closed or failing otherwise: nothing left to save it from
        pass
    return EXIT_CLOSED_OUTPUT


def _error(message: str) -> int:
    """A user error: one line on stderr (naming the rank under torchrun), exit code 2."""
    from aekit import distributed

    ranks = distributed.current()
    where = "" if ranks.is_main else f" (rank {ranks.rank})"
    print(f"aekit: error{where}: {_one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


def _internal_error(exc: Exception) -> int:
    """A bug in aekit: one line saying so (the traceback too with ``AEKIT_TRACEBACK=1``), exit 1."""
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        traceback.print_exc()
    what = _one_line(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    print(f"aekit: internal error: {what}. This is a bug in "
          f"aekit, not in what you did: please report it to {BUG_REPORTS} with the command you ran "
          f"and the traceback ({TRACEBACK_ENV}=1 aekit ... prints it)", file=sys.stderr)
    return EXIT_FAILED


def _show_warning(message, category, filename, lineno, file=None, line=None, command=None) -> None:
    """A Python warning raised during a command, as one ``aekit: warning:`` line (rank 0
    only, parameters named as flags), never the raw ``file:line: UserWarning:`` text."""
    if _is_main_rank():
        print(f"aekit: warning: {_one_line(as_flags(str(message), command))}", file=sys.stderr)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _is_main_rank() -> bool:
    """False on the ranks other than 0 of a torchrun launch: rank 0 prints for the run.

    The rank is known once the process group is set up (cmd_train does that first); before,
    every process answers as rank 0 of 1, and an error then is printed by every rank.
    """
    from aekit import distributed

    return distributed.current().is_main
