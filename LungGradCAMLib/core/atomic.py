"""Atomic writing: a file is written under a temporary name in its folder, then renamed; a run's
output folder is owned by the run and filled as a whole (:func:`output_folder`).

A crash or error never leaves a half-written file under a final name, a run never writes over a
file it did not create, and two runs never mix their files in one folder. Temporary names start
with ``.tmp-``; one left by a killed process is removed by the next run into the folder.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import FolderBusyError, OutputError
from .paths import check_path, kind

TMP_PREFIX = ".tmp-"
#: The lock file a run holds in its output folder (removed when it ends).
LOCK_NAME = ".lunggradcam.lock"
#: A run's records: ``report.json`` lists the files of a complete run (its ``files``) and is
#: written last; ``error.json`` records a batch series that failed.
RECORDS = ("report.json", "error.json")

try:
    import fcntl

    def _flock(fd: int, wait: bool) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))  # BlockingIOError when held
except ImportError:  # Windows
    import msvcrt

    def _flock(fd: int, wait: bool) -> None:
        try:
            msvcrt.locking(fd, msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
        except OSError:
            raise BlockingIOError from None


@contextlib.contextmanager
def atomic_path(path: "str | os.PathLike[str]") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same extension, so writers pick the same format);
    on success it is renamed onto ``path``, on error it is removed."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{secrets.token_hex(4)}-{final.name}"
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(path: "str | os.PathLike[str]", data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: "str | os.PathLike[str]", text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite number (Python or numpy, in dicts, lists and arrays)
    replaced by None: JSON has no such numbers."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy arrays and scalars
        return _finite(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: "str | os.PathLike[str]", obj: Any, default: Optional[Callable[[Any], Any]] = None) -> Path:
    """Write ``obj`` as indented, strict JSON (NaN and infinities become null) atomically."""
    return write_text(path, json.dumps(_finite(obj), indent=2, allow_nan=False, default=default) + "\n")


# --------------------------------------------------------------------------------------------
# a run's output folder
# --------------------------------------------------------------------------------------------
#: Output folders owned now ((thread, real path) -> staging folder), so that a run's steps
#: (``run_one``, then ``write_outputs``) share one ownership.
_OWNED: Dict[Tuple[int, str], Path] = {}


def _listed(report: Path) -> List[str]:
    """The file names a run's ``report.json`` lists as its outputs ([] when it lists none)."""
    try:
        files = json.loads(report.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError, RecursionError):
        return []
    return [f for f in files if isinstance(f, str) and f == Path(f).name] if isinstance(files, list) else []


def _foreign(folder: Path) -> List[str]:
    """Entries of ``folder`` that no LungGradCAM run wrote: not a record, the lock, a temporary,
    nor listed by the report of a complete run or of one killed while moving its files in."""
    ours = {LOCK_NAME, *RECORDS, *_listed(folder / "report.json")}
    for staging in folder.glob(f"{TMP_PREFIX}*"):
        ours.update(_listed(staging / "report.json"))
    return sorted(n for n in os.listdir(folder) if n not in ours and not n.startswith(TMP_PREFIX))


def _remove_stale(folder: Path) -> None:
    """Remove the temporaries that processes killed while writing into ``folder`` left (call it
    only while holding the folder's lock: then no live writer has any)."""
    for entry in folder.glob(f"{TMP_PREFIX}*"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def check_output_folder(out: "str | os.PathLike[str]", inputs: Sequence["str | os.PathLike[str]"] = (),
                        exclusive: bool = True) -> Path:
    """Check, before any work and without creating anything, that ``out`` can take a run's
    outputs: a path C++ libraries accept, neither one of ``inputs`` nor a folder that holds one
    (symbolic links resolved), a folder or nothing yet, writable (a probe file is created and
    removed; a read-only or immutable folder fails here), and with ``exclusive`` holding only
    what earlier runs wrote. Raises :class:`OutputError` saying what to do."""
    out = check_path(out, "output folder")
    try:
        real = out.resolve()
        for source in inputs:
            src = Path(source).resolve()
            if src == real or real in src.parents:
                raise OutputError(f"{out} {'is' if src == real else 'holds'} the input {source}; a run never "
                                  "writes among its input: choose another output folder")
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise OutputError(f"{out} is a {kind(out.stat().st_mode) if out.exists() else 'broken link'}, "
                                  "not a folder: choose a folder for the outputs")
            foreign = _foreign(out) if exclusive else []
            if foreign:
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                raise OutputError(f"{out} holds {len(foreign)} file(s) that no LungGradCAM run wrote ({shown}); "
                                  "a run replaces only its own outputs: choose an empty or new folder")
            where = out
        else:
            where = next(p for p in real.parents if p.exists())
            if not where.is_dir():
                raise OutputError(f"{out} cannot be made: {where} is a file, not a folder")
        probe = where / f"{TMP_PREFIX}probe-{secrets.token_hex(4)}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{out}: cannot write there ({exc.strerror}); choose another output folder") from None
    return out


def _lock(folder: Path, wait: bool) -> int:
    """Hold ``folder``'s lock file (made if missing); without ``wait`` a lock another process
    holds raises :class:`FolderBusyError`. Returns the file descriptor that holds it."""
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            _flock(fd, wait)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusyError(f"{folder}: another run is writing into this folder now; wait until it "
                                  "ends, or choose another output folder") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed the file as it let go: take the new one


def _unlock(folder: Path, fd: int) -> None:
    with contextlib.suppress(OSError):  # removed while still held (Windows cannot: it stays)
        (folder / LOCK_NAME).unlink()
    os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: "str | os.PathLike[str]") -> Iterator[Path]:
    """Hold ``folder``'s lock (waiting for another holder) and remove stale temporaries in it."""
    folder = Path(folder)
    fd = _lock(folder, wait=True)
    try:
        _remove_stale(folder)
        yield folder
    finally:
        _unlock(folder, fd)


def _commit(staging: Path, final: Path) -> None:
    """Move the files of ``staging`` into ``final``, replacing the previous run's outputs. At every
    step each entry of ``final`` is listed by ``final``'s report or by ``staging``'s, which moves
    last: a process killed midway leaves a folder without a report, which the next run clears."""
    new = sorted(os.listdir(staging))
    for name in set(_listed(final / "report.json")) - set(new):
        (final / name).unlink(missing_ok=True)  # an output of the previous run this one did not make
    for name in RECORDS:
        (final / name).unlink(missing_ok=True)  # from here the folder reads as incomplete
    for name in sorted(new, key=lambda n: n in RECORDS):  # the records last
        os.replace(staging / name, final / name)
    staging.rmdir()


@contextlib.contextmanager
def output_folder(out: "str | os.PathLike[str]", inputs: Sequence["str | os.PathLike[str]"] = ()) -> Iterator[Path]:
    """Own ``out`` for one run: checked (:func:`check_output_folder`), made, locked (a second run
    into it raises :class:`FolderBusyError`), cleared of stale temporaries; yields a fresh staging
    folder inside it to write the run's files into. On success they replace the previous run's
    outputs (:func:`_commit`); on error nothing in ``out`` changes, and a folder the run made is
    removed again. Nested use for the same folder in this process yields the same staging folder."""
    final = check_path(out, "output folder")
    key = (threading.get_ident(), os.path.realpath(final))
    if key in _OWNED:
        yield _OWNED[key]
        return
    check_output_folder(final, inputs)
    made = not final.exists()
    try:
        final.mkdir(parents=True, exist_ok=True)
        fd = _lock(final, wait=False)
    except OSError as exc:
        raise OutputError(f"{final}: cannot write there ({exc.strerror}); choose another output folder") from None
    staging = final / f"{TMP_PREFIX}run-{secrets.token_hex(4)}"
    try:
        _remove_stale(final)
        check_output_folder(final, inputs)  # again, now that no other run can change it
        staging.mkdir()
        _OWNED[key] = staging
        yield staging
        try:
            _commit(staging, final)
        except OSError as exc:
            raise OutputError(f"{final}: cannot move the outputs into place ({exc.strerror})") from None
    finally:
        _OWNED.pop(key, None)
        shutil.rmtree(staging, ignore_errors=True)
        _unlock(final, fd)
        if made:
            with contextlib.suppress(OSError):
                final.rmdir()  # only when empty: the run failed before writing anything
