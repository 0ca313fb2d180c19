"""Checks on the paths a user gives, before they reach a C++ library or block the process.

ITK aborts the whole process (SIGABRT) on a file name that is not UTF-8, and a name over the file
system's limit fails only at the end of a run; a FIFO, ``/dev/stdin`` or a device opened as a file
blocks forever or never ends. These checks turn each into a :class:`LungGradCAMError` naming the
path.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO, Union

from .errors import InvalidInputError

PathLike = Union[str, "os.PathLike[str]"]
#: NAME_MAX of every common file system (ext4, XFS, APFS, NTFS): bytes of one path component.
NAME_MAX = 255
_KINDS = (
    (stat.S_ISFIFO, "named pipe (FIFO)"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISDIR, "folder"),
)


def check_path(path: PathLike, what: str = "path") -> Path:
    """``path`` as a :class:`Path` once it is one that C++ libraries can take: UTF-8 (Python
    keeps other bytes as surrogates, which ITK cannot convert) and no component over
    :data:`NAME_MAX` bytes. Raises :class:`InvalidInputError` naming it otherwise."""
    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(
            f"{what} {raw!r} holds bytes that are not UTF-8 text; rename the file or "
            "folder (or pass a link to it whose name is UTF-8)"
        ) from None
    for part in raw.split(b"/"):
        if len(part) > NAME_MAX:
            raise InvalidInputError(
                f"{what} {os.fsdecode(raw)!r}: the name {os.fsdecode(part[:40])!r}... is "
                f"{len(part)} bytes long, more than the {NAME_MAX} a file system allows; "
                "choose a shorter name"
            )
    return Path(os.fsdecode(raw))


def kind(mode: int) -> str:
    """What a ``st_mode`` is: "file", "folder", "named pipe (FIFO)", "socket", ... ."""
    if stat.S_ISREG(mode):
        return "file"
    return next((name for test, name in _KINDS if test(mode)), "special file")


def is_special(path: PathLike) -> bool:
    """True for a FIFO, socket or device (links followed): never to be opened by a folder scan. A
    path that cannot be examined (a link loop, no permission) is not special: opening it reports why."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def open_regular(path: PathLike) -> BinaryIO:
    """Open ``path`` for binary reading when it is a regular file (links followed). A FIFO, socket
    or device raises :class:`OSError` (``EINVAL``) saying what it is; opening never blocks."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"not a regular file but a {kind(mode)}", os.fspath(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
