"""The ``lunggradcam`` command line: demo | run | batch | train | evaluate | bench | dicom-db | info.

Errors a user can cause (:class:`LungGradCAMError`) are printed without a traceback, exit status 2.
Besides that one message a command prints its own warnings (:class:`LungGradCAMWarning`) as one
note each; other libraries' warnings and log lines only with ``-v``; all of it escaped (text from
a file never starts a line of its own nor drives the terminal).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from typing import Any, Callable, List, NoReturn, Optional

from .. import __version__
from ..core.atomic import raise_when_allowed
from ..core.errors import LungGradCAMError, LungGradCAMWarning
from ..core.limits import is_out_of_memory, out_of_memory
from ..core.text import escaped
from .common import NEGATIVE_VALUE_OPTIONS

# One module per command, each registering it with ``add_cli(subparsers)``, in the order of --help.
_COMMAND_MODULES = (".demo", ".run", ".batch", ".train", ".evaluate", ".bench", ".dicomdb", ".info")
_VERBOSE_HELP = "log each stage and its time"


class _Parser(argparse.ArgumentParser):
    """Parse errors as one message naming the option and what to give, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_printable(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lunggradcam",
        description="Grad-CAM explanations of 3D CNNs on lung CT (LungGradCAM).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name, __package__).add_cli(sub)
    for command in sub.choices.values():  # -v also after the command; SUPPRESS keeps one given before it
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)
    return parser


def _join_negative_values(argv: List[str]) -> List[str]:
    """``--roi -55.5,-85.6,-116,40`` as ``--roi=-55.5,...``: argparse takes a value starting with
    "-" that is not a plain number for an option, and negative RAS coordinates are normal."""
    joined: List[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in NEGATIVE_VALUE_OPTIONS and i + 1 < len(argv) and re.match(r"^-[\d.]", argv[i + 1]):
            joined.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            joined.append(argv[i])
            i += 1
    return joined


def _printable(text: str) -> str:
    """A message for the terminal: control characters escaped (``\\x1b``; messages quote DICOM
    fields, which a hostile file can fill with escape sequences) and every line after the first
    indented, so that no line of it reads as a message of its own."""
    lines = [escaped(line, None) for line in text.split("\n")]
    return "\n".join(lines[:1] + [line if line.startswith(" ") else "  " + line for line in lines[1:]])


class _OneLine(logging.Formatter):
    """Log lines whose message is escaped (:func:`escaped`): one line, no terminal control."""

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord({**record.__dict__, "msg": escaped(record.getMessage()), "args": ()})
        return super().format(record)


def _show_warnings(command: str) -> Callable[..., None]:
    """A ``warnings.showwarning``: LungGradCAM's own warnings as one note on stderr, other
    libraries' (numpy's RuntimeWarning, torch's UserWarning) to the log, shown with ``-v``."""

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if issubclass(category, LungGradCAMWarning):
            from tqdm import tqdm

            tqdm.write(f"lunggradcam {command}: note: {escaped(message)}", file=sys.stderr)
        else:
            logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)

    return show


class Terminated(BaseException):
    """SIGTERM arrived: raised where the process is, so that every ``finally`` removes the
    temporaries it made (a killed batch under torchrun gets SIGTERM first)."""


def _terminate(signum: int, frame: object) -> None:
    raise_when_allowed(Terminated)


def _interrupt(signum: int, frame: object) -> None:
    raise_when_allowed(KeyboardInterrupt)


def main(argv: Optional[List[str]] = None) -> int:
    # numpy asks the kernel for transparent huge pages for every large array; where the kernel
    # then compacts memory on the spot (defrag "madvise", the common default) and other processes
    # have fragmented it, the first touch of each CT-sized array stalls: 3 s of CPU in a 512x512x300
    # run on a shared machine (README, "Speed"). Off in this process, before numpy is imported,
    # unless the user chose.
    os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
    started = time.perf_counter()
    parser = build_parser()
    try:
        args = parser.parse_args(_join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    except SystemExit as exc:  # --help, --version, or a wrong option (message printed, status 2)
        return int(exc.code or 0)
    # A command's report counts its total from the package's import (before the imports of numpy,
    # torch...): its wall time but for the interpreter's own start (tens of ms). Called from Python
    # with argv (a test, a script), from this call.
    from .. import IMPORT_STARTED

    args.started = IMPORT_STARTED if argv is None else started
    package = __package__.rpartition(".")[0]
    handler = logging.StreamHandler()
    handler.setFormatter(_OneLine("%(levelname)s %(name)s: %(message)s"))
    if not args.verbose:  # other libraries' log lines (pydicom's WARNINGs): with -v only
        handler.addFilter(lambda record: record.name == package or record.name.startswith(package + "."))
    logging.basicConfig(handlers=[handler])  # unless the program that calls main configured logging
    logging.getLogger(package).setLevel(logging.INFO if args.verbose else logging.WARNING)
    shown = warnings.showwarning
    if shown is getattr(warnings, "_showwarning_orig", None):  # not when a caller records warnings
        warnings.showwarning = _show_warnings(args.command)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main_thread:  # Ctrl-C as Python's own handler would, unless the process ignores it
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _terminate)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)
    try:
        return int(args.func(args) or 0)
    except LungGradCAMError as exc:
        print(f"lunggradcam {args.command}: error: {_printable(str(exc))}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:  # an allocator's failure where no step turned it into a message
        if not is_out_of_memory(exc):
            raise
        message = out_of_memory(f"running lunggradcam {args.command}", exc)
        print(f"lunggradcam {args.command}: error: {_printable(str(message))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lunggradcam {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"lunggradcam {args.command}: terminated (SIGTERM); no partial output was left", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        warnings.showwarning = shown
        for n, handler in previous.items():
            signal.signal(n, handler)
