"""Atomic writing: a file is written under a temporary name in its folder, then renamed; a run's
output folder is owned by the run and filled as a whole (:func:`output_folder`).

A crash or error never leaves a half-written file under a final name, a run never deletes or
writes over a file it did not create, and two runs never mix their files in one folder.

What in a folder is LungGradCAM's is proven only by its marker, ``.lunggradcam.json``, which a
run writes and no other tool does: it names the run that wrote the folder's outputs and each
output with the SHA-256 of its bytes, and it may name only the outputs the caller says it makes
(``names``). A file is the run's when the marker names it and its bytes are the ones named; any
other entry, whatever its name (``report.json``, ``.tmp-notes``, ``cam.nrrd`` edited by hand),
is the user's: a folder that holds one is refused, never cleared. A run writes into the marker's
work folder, ``.lunggradcam-work``, and moves its files in only when all are written.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import threading
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import FolderBusyError, OutputError
from .paths import check_path, kind

#: What an atomic write's temporary name starts with (it is never removed by its name alone).
TMP_PREFIX = ".tmp-"
#: The lock file a run holds in its output folder (an empty file; removed when the run ends).
LOCK_NAME = ".lunggradcam.lock"
#: The marker that proves which entries of an output folder LungGradCAM wrote (see the module doc).
MARKER = ".lunggradcam.json"
#: The folder, vouched for by the marker, a run writes into before its files are moved in.
WORK = ".lunggradcam-work"
#: A run's records: ``report.json`` lists the files of a complete run (its ``files``); with
#: ``error.json`` (a batch series that failed) it is moved out first and in last, so that a
#: folder with a record holds the whole of that record's run.
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


def strict_json(obj: Any, **kwargs: Any) -> str:
    """``obj`` as strict JSON text (NaN and infinities become null, which every JSON reader takes);
    ``kwargs`` as for :func:`json.dumps`."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def write_json(path: "str | os.PathLike[str]", obj: Any, default: Optional[Callable[[Any], Any]] = None) -> Path:
    """Write ``obj`` as indented, strict JSON (NaN and infinities become null) atomically."""
    return write_text(path, strict_json(obj, indent=2, default=default) + "\n")


# --------------------------------------------------------------------------------------------
# a run's output folder
# --------------------------------------------------------------------------------------------
#: Output folders owned now ((thread, real path) -> staging folder), so that a run's steps
#: (``run_one``, then ``write_outputs``) share one ownership.
_OWNED: Dict[Tuple[int, str], Path] = {}
#: The marker's "lunggradcam" field: says what the file is.
_MARK = "LungGradCAM output folder"
_MAX_MARKER_BYTES = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _identity(path: Path) -> Optional[Tuple[int, int, int, int]]:
    """(device, inode, size, mtime) of a regular file (links not followed); None for anything else."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def _read_marker(path: Path, names: Collection[str]) -> Optional[Dict[str, Any]]:
    """The marker at ``path`` as ``{"run": id, "vouched": {name: [sha256, ...]}}`` when it is one
    LungGradCAM wrote naming only files among ``names``; None when it is anything else. An empty
    marker is one a run was killed making (it makes it in one write, with nothing else in the
    folder): it vouches for nothing (``run`` None)."""
    ident = _identity(path)
    if ident is None or ident[2] > _MAX_MARKER_BYTES:
        return None
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if text else {"lunggradcam": _MARK, "run": None, "files": {}}
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("lunggradcam") != _MARK:
        return None
    run, parts = data.get("run"), [data.get("files"), data.get("incoming", {})]
    if not (run is None and text == "" or isinstance(run, str) and re.fullmatch("[0-9a-f]{32}", run)):
        return None
    vouched: Dict[str, List[str]] = {}
    for part in parts:  # a run moving its files in vouches for the old ones and the new ones
        if not isinstance(part, dict):
            return None
        for name, digest in part.items():
            if name not in names or not isinstance(digest, str):
                return None
            vouched.setdefault(name, []).append(digest)
    return {"run": run, "vouched": vouched}


def _ownership(folder: Path, names: Collection[str], exclusive: bool) -> Tuple[Optional[Dict[str, Any]], List[str]]:
    """(the folder's marker, as :func:`_read_marker` gives it, with ``present``: name -> SHA-256
    of each output it vouches for that is there, and ``identity``: their :func:`_identity`; the
    entries of ``folder`` that are not provably LungGradCAM's). With ``exclusive`` every other
    entry counts; without, only those under a name the run would write (``names``, the marker,
    the lock, the work folder)."""
    entries = os.listdir(folder)
    marker = _read_marker(folder / MARKER, names) if MARKER in entries else None
    ours = set()
    if marker is not None:
        ours.add(MARKER)
        marker["present"], marker["identity"] = {}, {}
        for name, digests in marker["vouched"].items():
            ident = _identity(folder / name)
            try:
                digest = _sha256(folder / name) if ident is not None else None
            except OSError:  # unreadable now: not provably the file a run wrote
                digest = None
            if digest in digests:
                ours.add(name)
                marker["present"][name], marker["identity"][name] = digest, ident
        work = folder / WORK
        if marker["run"] is not None and work.is_dir() and not work.is_symlink():
            ours.add(WORK)
    lock = _identity(folder / LOCK_NAME)
    if lock is not None and lock[2] == 0:  # an empty file: the lock of a run (a killed run leaves one)
        ours.add(LOCK_NAME)
    considered = entries if exclusive else [e for e in entries if e in {*names, MARKER, WORK, LOCK_NAME}]
    return marker, sorted(e for e in considered if e not in ours)


def _not_ours(out: Path, foreign: List[str]) -> OutputError:
    shown = ", ".join(repr(n)[1:-1] for n in foreign[:5]) + (", ..." if len(foreign) > 5 else "")
    return OutputError(f"{out} holds {len(foreign)} file(s) that no LungGradCAM run wrote ({shown}); a run replaces "
                       f"only the outputs its marker {MARKER} names, byte for byte: choose an empty or new folder, "
                       "or move those files away")


def read_record(folder: "str | os.PathLike[str]", name: str, names: Collection[str]) -> Optional[Dict[str, Any]]:
    """The JSON object of ``folder/name`` (a run's ``report.json``, ``error.json``) when the
    folder's marker vouches for it, byte for byte (``names``: the outputs the folder may hold);
    None when it is missing, not LungGradCAM's, or not an object."""
    folder = Path(folder)
    marker = _read_marker(folder / MARKER, names)
    if marker is None or name not in marker["vouched"] or _identity(folder / name) is None:
        return None
    try:
        data = (folder / name).read_bytes()
        record = json.loads(data) if hashlib.sha256(data).hexdigest() in marker["vouched"][name] else None
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def check_output_folder(out: "str | os.PathLike[str]", inputs: Sequence["str | os.PathLike[str]"] = (),
                        names: Collection[str] = (), exclusive: bool = True) -> Path:
    """Check, before any work and without creating anything, that ``out`` can take a run's
    outputs (file names ``names``): a path C++ libraries accept, neither one of ``inputs``, nor
    inside one, nor a folder that holds one (symbolic links resolved), a folder or nothing yet,
    writable (a probe file is created and removed; a read-only or immutable folder fails here),
    and holding nothing but what LungGradCAM provably wrote there (see the module doc; without
    ``exclusive``, nothing under a name the run would write). Raises :class:`OutputError`
    saying what to do."""
    out = check_path(out, "output folder")
    try:
        real = out.resolve()
        for source in inputs:
            src = Path(source).resolve()
            if src == real or real in src.parents or src in real.parents:
                where = "is" if src == real else "holds" if real in src.parents else "is inside"
                raise OutputError(f"{out} {where} the input {source}; a run never writes among its input: "
                                  "choose an output folder outside it")
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise OutputError(f"{out} is a {kind(out.stat().st_mode) if out.exists() else 'broken link'}, "
                                  "not a folder: choose a folder for the outputs")
            foreign = _ownership(out, names, exclusive)[1]
            if foreign:
                raise _not_ours(out, foreign)
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
    """Hold ``folder``'s lock file (made if missing; one that is not an empty file is not a lock
    LungGradCAM made and is left alone); without ``wait`` a lock another process holds raises
    :class:`FolderBusyError`. Returns the file descriptor that holds it."""
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size:
            os.close(fd)
            raise _not_ours(folder, [LOCK_NAME])
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


def _write_marker(folder: Path, run: str, files: Dict[str, str], incoming: Optional[Dict[str, str]] = None) -> None:
    """Replace ``folder``'s marker atomically (its temporary lies in the work folder it vouches for)."""
    data = {"lunggradcam": _MARK, "run": run, "files": dict(sorted(files.items()))}
    if incoming:
        data["incoming"] = dict(sorted(incoming.items()))
    tmp = folder / WORK / f"marker-{secrets.token_hex(4)}.json"
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MARKER)


def _first_marker(folder: Path, run: str) -> None:
    """Make the marker of a folder that has none (it holds nothing but the lock): created, never
    replacing anything, in one write."""
    fd = os.open(folder / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        os.write(fd, (json.dumps({"lunggradcam": _MARK, "run": run, "files": {}}) + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def _move_in(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` without ever replacing what is there (another program may have put
    a file under that name while the run worked): a hard link, which fails when ``dst`` exists,
    then the unlink of ``src``; a rename after a check where the file system has no hard links."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise _not_ours(dst.parent, [dst.name]) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(dst):
            raise _not_ours(dst.parent, [dst.name]) from None
        os.replace(src, dst)
        return
    os.unlink(src)


def _commit(final: Path, marker: Dict[str, Any], run: str, replace: bool) -> None:
    """Move the files of the work folder's ``new`` into ``final``. Only now, with every new file
    written, are the outputs they replace (with ``replace`` every one the marker vouches for,
    else those of the same names) moved aside into the work folder, the records first; then the
    new ones move in, the records last, and the marker names them. At every step the marker
    vouches for each entry of ``final``. On an error everything is moved back, so that the
    folder is as it was, and the error is raised."""
    work, staging = final / WORK, final / WORK / "new"
    new = {name: _sha256(staging / name) for name in sorted(os.listdir(staging))}
    present = marker["present"]
    old = [n for n in present if replace or n in new]
    kept = {n: h for n, h in present.items() if n not in old}
    aside, moved_out, moved_in = work / "old", [], []
    try:
        _write_marker(final, run, present, new)
        aside.mkdir()
        for name in sorted(old, key=lambda n: n not in RECORDS):  # the records first
            if _identity(final / name) != marker["identity"][name]:
                raise OutputError(f"{final / name} changed while the run was working: it is no longer the file "
                                  "LungGradCAM wrote, so the run leaves it and its outputs; run again")
            os.replace(final / name, aside / name)
            moved_out.append(name)
        for name in sorted(new, key=lambda n: n in RECORDS):  # the records last
            _move_in(staging / name, final / name)
            moved_in.append(name)
        _write_marker(final, run, {**kept, **new})
    except BaseException:
        for name in moved_in:
            with contextlib.suppress(OSError):
                os.replace(final / name, staging / name)
        for name in moved_out:
            with contextlib.suppress(OSError):
                _move_in(aside / name, final / name)
        with contextlib.suppress(OSError):
            _write_marker(final, marker["run"], present)
        raise


@contextlib.contextmanager
def output_folder(out: "str | os.PathLike[str]", inputs: Sequence["str | os.PathLike[str]"] = (),
                  names: Collection[str] = (), *, exclusive: bool = True, replace: bool = True,
                  wait: bool = False) -> Iterator[Path]:
    """Own ``out`` for one run that writes files named among ``names``: checked
    (:func:`check_output_folder`), made, locked (a second run into it raises
    :class:`FolderBusyError`; with ``wait`` it waits for the first), cleared of the work folder a
    killed run left; yields a fresh staging folder to write the run's files into. On success they
    replace the outputs the folder's marker vouches for (all of them with ``replace``, else those
    of the same names) (:func:`_commit`); on error nothing in ``out`` changes, and a folder the
    run made is removed again. Nested use for the same folder in this process yields the same
    staging folder."""
    final = check_path(out, "output folder")
    key = (threading.get_ident(), os.path.realpath(final))
    if key in _OWNED:
        yield _OWNED[key]
        return
    check_output_folder(final, inputs, names, exclusive)
    made = not final.exists()
    try:
        final.mkdir(parents=True, exist_ok=True)
        fd = _lock(final, wait=wait)
    except OSError as exc:
        raise OutputError(f"{final}: cannot write there ({exc.strerror}); choose another output folder") from None
    run, first, done = secrets.token_hex(16), False, False
    try:
        try:
            marker, foreign = _ownership(final, names, exclusive)  # again, now that no other run can change it
            if foreign:
                raise _not_ours(final, foreign)
            if marker is None or marker["run"] is None:
                (final / MARKER).unlink(missing_ok=True)  # an empty one: a run killed as it made it
                first, marker = True, {"run": run, "present": {}, "identity": {}}
                _first_marker(final, run)
            shutil.rmtree(final / WORK, ignore_errors=True)  # what a killed run left (the marker vouches for it)
            (final / WORK / "new").mkdir(parents=True)
        except OSError as exc:  # a full disk, a folder made read-only meanwhile
            raise OutputError(f"{final}: cannot write there ({exc.strerror}); choose another output folder") from None
        _OWNED[key] = final / WORK / "new"
        yield final / WORK / "new"
        try:
            _commit(final, marker, run, replace)
        except OSError as exc:
            raise OutputError(f"{final}: cannot move the outputs into place ({exc.strerror}); the folder is "
                              "as it was") from None
        done = True
    finally:
        _OWNED.pop(key, None)
        # the replaced outputs go too, unless a failed run could not move them back (the next run
        # into the folder clears them)
        shutil.rmtree(final / (WORK if done or not any((final / WORK / "old").glob("*")) else f"{WORK}/new"),
                      ignore_errors=True)
        if first and not done:
            (final / MARKER).unlink(missing_ok=True)
        _unlock(final, fd)
        if made:
            with contextlib.suppress(OSError):
                final.rmdir()  # only when empty: the run failed before writing anything
