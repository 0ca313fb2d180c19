"""Atomic writing: a file is written under a temporary name in its folder, then renamed; a run's
output folder is owned by the run and filled as a whole (:func:`output_folder`).

A crash or error never leaves a half-written file under a final name, a run never deletes or
writes over a file it did not create, and two runs never mix their files in one folder.

What in a folder is LungGradCAM's is proven only by its marker, ``.lunggradcam.json``, which a
run writes and no other tool does: it names the run that wrote the folder's outputs and each
output with the SHA-256 of its bytes, and it may name only the outputs the caller says it makes
(``names``: paths relative to the folder, ``/`` between subfolders, whose parts may hold
wildcards: ``fold*/report.json``, ``dicom/*``). A file is the run's when the marker names it and
its bytes are the ones named, a subfolder when everything in it is the run's; any other entry,
whatever its name (``report.json``, ``.tmp-notes``, ``cam.nrrd`` edited by hand, a file of the
user's in ``dicom/``), is the user's: a folder that holds one is refused, never cleared. A run
writes into the marker's work folder, ``.lunggradcam-work``, and moves its files in only when all
are written. Every command that writes into a folder the user names owns it this way (``run``,
``batch``, ``train``, ``evaluate``, ``demo``); a single file the user names (a patch cache, a
DICOM database) is created without ever replacing one (:func:`atomic_path` with ``replace=False``).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
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


#: How deep in :func:`signals_held` blocks the process is, and the exception a signal handler
#: asked for meanwhile (raised when the outermost block ends).
_HELD: Dict[str, Any] = {"depth": 0, "pending": None}


def raise_when_allowed(exception: Callable[[], BaseException]) -> None:
    """For a signal handler (SIGTERM, SIGINT): raise ``exception()`` now, or, inside a
    :func:`signals_held` block, when the block ends."""
    if _HELD["depth"]:
        _HELD["pending"] = exception
        return
    raise exception()


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Defer the exceptions that signal handlers raise through :func:`raise_when_allowed` to the
    end of the block. Start writer threads inside it: a signal that interrupts ``Thread.start``
    leaves a thread that ``ThreadPoolExecutor`` never joins, writing into a folder its run has
    already cleaned up."""
    _HELD["depth"] += 1
    try:
        yield
    finally:
        _HELD["depth"] -= 1
        pending = _HELD["pending"]
        if not _HELD["depth"] and pending is not None:
            _HELD["pending"] = None
            raise pending()


@contextlib.contextmanager
def atomic_path(path: "str | os.PathLike[str]", replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same extension, so writers pick the same format);
    on success it is renamed onto ``path``, on error it is removed. Without ``replace`` it never
    replaces anything at ``path`` (a file made there meanwhile, a link): :class:`OutputError`."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{secrets.token_hex(4)}-{final.name}"
    try:
        yield tmp
        if replace:
            os.replace(tmp, final)
        else:
            try:
                _move_in(tmp, final)
            except FileExistsError:
                raise OutputError(
                    f"{final} exists (it was made while LungGradCAM wrote its own); LungGradCAM "
                    "never overwrites a file it did not write: move it away or choose another "
                    "name"
                ) from None
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


def _inside(name: str) -> bool:
    """Whether ``name`` is a path relative to a folder that stays inside it: ``/`` between
    subfolders, no empty, ``.`` or ``..`` part, no backslash (a marker may not reach out)."""
    return all(part not in ("", ".", "..") and "\\" not in part and "\0" not in part for part in name.split("/"))


def _allowed(name: str, names: Collection[str]) -> bool:
    """Whether ``name``, a path relative to an output folder (:func:`_inside` it), is one of
    ``names`` (such paths, whose parts may hold :mod:`fnmatch` wildcards): as many parts, each
    matching."""
    parts = name.split("/")
    return _inside(name) and any(
        len(allowed) == len(parts) and all(map(fnmatch.fnmatchcase, parts, allowed))
        for allowed in (n.split("/") for n in names)
    )


def _is_folder(path: Path) -> bool:
    """A real folder (not a link to one)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_marker(path: Path, names: Collection[str]) -> Optional[Dict[str, Any]]:
    """The marker at ``path`` as ``{"run": id, "vouched": {name: [sha256, ...]}, "others": [...]}``
    when it is one LungGradCAM wrote; ``others``: the names it vouches for that are not among
    ``names`` (the marker of another command's folder: it vouches for nothing here). None when it
    is anything else. An empty marker is one a run was killed making (it makes it in one write,
    with nothing else in the folder): it vouches for nothing (``run`` None)."""
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
            if not isinstance(name, str) or not _inside(name) or not isinstance(digest, str):
                return None  # a path out of the folder: not a marker LungGradCAM wrote
            vouched.setdefault(name, []).append(digest)
    others = sorted(n for n in vouched if not _allowed(n, names))
    return {"run": run, "vouched": {} if others else vouched, "others": others}


def _ownership(
    folder: Path, names: Collection[str], exclusive: bool
) -> Tuple[Optional[Dict[str, Any]], List[str], List[str]]:
    """(the folder's marker, as :func:`_read_marker` gives it, with ``present``: relative path ->
    SHA-256 of each output it vouches for that is there, and ``identity``: their
    :func:`_identity`; the entries of ``folder`` that are not provably LungGradCAM's, inside its
    subfolders too; the names a marker of another command vouches for). With ``exclusive`` every
    other entry counts; without, only those under a name the run would write (``names``, the
    marker, the lock, the work folder)."""
    entries = os.listdir(folder)
    marker = _read_marker(folder / MARKER, names) if MARKER in entries else None
    others = marker["others"] if marker is not None else []
    if others:
        marker = None
    ours = set()
    if marker is not None:
        ours.add(MARKER)
        marker["present"], marker["identity"] = {}, {}
        work = folder / WORK
        if marker["run"] is not None and _is_folder(work):
            ours.add(WORK)
    lock = _identity(folder / LOCK_NAME)
    if lock is not None and lock[2] == 0:  # an empty file: the lock of a run (a killed run leaves one)
        ours.add(LOCK_NAME)

    def foreign_under(rel: str) -> List[str]:
        """The entries at and under ``rel`` that the marker does not vouch for (none: ``rel`` is ours)."""
        path, vouched = folder / rel, marker["vouched"]
        ident = _identity(path)
        if ident is not None and rel in vouched:
            try:
                digest = _sha256(path)
            except OSError:  # unreadable now: not provably the file a run wrote
                digest = None
            if digest in vouched[rel]:
                marker["present"][rel], marker["identity"][rel] = digest, ident
                return []
        elif ident is None and _is_folder(path) and any(v.startswith(rel + "/") for v in vouched):
            return [f for entry in sorted(os.listdir(path)) for f in foreign_under(f"{rel}/{entry}")]
        return [rel]

    considered = (
        entries
        if exclusive
        else [
            e
            for e in entries
            if e in (MARKER, WORK, LOCK_NAME) or any(fnmatch.fnmatchcase(e, n.split("/")[0]) for n in names)
        ]
    )
    foreign = []
    for entry in sorted(e for e in considered if e not in ours):
        foreign += [entry] if marker is None else foreign_under(entry)
    return marker, foreign, others


def _not_ours(out: Path, foreign: List[str], others: Sequence[str] = ()) -> OutputError:
    def shown(names: Sequence[str]) -> str:
        return ", ".join(repr(n)[1:-1] for n in names[:5]) + (", ..." if len(names) > 5 else "")

    if others:
        return OutputError(
            f"{out} holds files this command did not write ({shown(foreign)}): its marker {MARKER} names "
            f"{shown(others)}, which are not outputs of this command (the folder of another LungGradCAM "
            "command, or a marker no LungGradCAM run wrote); each command needs a folder of its own: "
            "choose an empty or new folder, or move those files away"
        )
    return OutputError(
        f"{out} holds {len(foreign)} file(s) that no LungGradCAM run wrote ({shown(foreign)}); a run "
        f"replaces only the outputs its marker {MARKER} names, byte for byte: choose an empty or new "
        "folder, or move those files away"
    )


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


def _probe(path: Path, real: Path) -> None:
    """Create and remove a file in ``real`` (``path`` resolved) when it is a folder, else in the
    nearest folder above it that exists (where ``path`` would be made): raises OSError where
    nothing can be written there, :class:`OutputError` where that is a file."""
    where = real if real.is_dir() else next(p for p in real.parents if p.exists())
    if not where.is_dir():
        raise OutputError(f"{path} cannot be made: {where} is a file, not a folder")
    probe = where / f"{TMP_PREFIX}probe-{secrets.token_hex(4)}"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    probe.unlink()


def check_output_folder(
    out: "str | os.PathLike[str]",
    inputs: Sequence["str | os.PathLike[str]"] = (),
    names: Collection[str] = (),
    exclusive: bool = True,
) -> Path:
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
                raise OutputError(
                    f"{out} {where} the input {source}; a run never writes among its input: "
                    "choose an output folder outside it"
                )
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise OutputError(
                    f"{out} is a {kind(out.stat().st_mode) if out.exists() else 'broken link'}, "
                    "not a folder: choose a folder for the outputs"
                )
            _, foreign, others = _ownership(out, names, exclusive)
            if foreign:
                raise _not_ours(out, foreign, others)
        _probe(out, real)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write there ({exc.strerror}); choose another output folder") from None
    return out


def check_new_file(path: "str | os.PathLike[str]", what: str = "file") -> Path:
    """Check, before any work and without creating anything, that ``path`` can take a new file that
    :func:`atomic_path` with ``replace=False`` writes: a path C++ libraries accept, nothing there
    yet (not even a broken link), in a folder that is one or can be made, writable (probed).
    Raises :class:`OutputError` saying what to do."""
    path = check_path(path, what)
    if os.path.lexists(path):
        there = kind(path.stat().st_mode) if path.exists() else "broken link"
        raise OutputError(
            f"{path} exists (a {there}); LungGradCAM never replaces what it did not write: move it "
            f"away or choose another {what}"
        )
    try:
        _probe(path, path.resolve())
    except OSError as exc:
        raise OutputError(f"{path}: cannot write there ({exc.strerror}); choose another {what}") from None
    return path


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
            raise FolderBusyError(
                f"{folder}: another run is writing into this folder now; wait until it "
                "ends, or choose another output folder"
            ) from None
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
    then the unlink of ``src``; a rename after a check where the file system has no hard links.
    Raises :class:`FileExistsError` when something is at ``dst``."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.replace(src, dst)
        return
    os.unlink(src)


def _files(folder: Path, prefix: str = "") -> List[str]:
    """Every entry of ``folder`` that is not a real folder, inside its subfolders too, as a path
    relative to it (``/`` between subfolders)."""
    found = []
    for entry in sorted(os.listdir(folder)):
        rel = f"{prefix}{entry}"
        found += _files(folder / entry, rel + "/") if _is_folder(folder / entry) else [rel]
    return found


def _make_parents(final: Path, name: str) -> List[Path]:
    """Make the missing subfolders of ``final`` that ``name`` lies in; returns those made, outermost
    first. One that is there but is not a real folder (a file, a link) is not the run's: refused."""
    made = []
    for depth in range(1, name.count("/") + 1):
        folder = final.joinpath(*name.split("/")[:depth])
        try:
            folder.mkdir()
            made.append(folder)
        except FileExistsError:
            if not _is_folder(folder):
                raise _not_ours(final, ["/".join(name.split("/")[:depth])]) from None
    return made


def _record_last(name: str) -> bool:
    return name.rsplit("/", 1)[-1] in RECORDS


def _commit(final: Path, marker: Dict[str, Any], run: str, replace: bool, names: Collection[str]) -> None:
    """Move the files of the work folder's ``new`` (subfolders too) into ``final``. Only now, with
    every new file written, are the outputs they replace (with ``replace`` every one the marker
    vouches for, else those of the same names) moved aside into the work folder, the records
    first; then the new ones move in, the records last, the subfolders the old ones leave empty
    are removed, and the marker names the new ones. At every step the marker vouches for each
    entry of ``final``. On an error everything is moved back, so that the folder is as it was,
    and the error is raised."""
    work, staging = final / WORK, final / WORK / "new"
    new = {name: _sha256(staging / name) for name in _files(staging)}
    strays = [name for name in new if not _allowed(name, names)]
    if strays:  # a writer's bug: the marker would name a file the command does not make
        raise OutputError(
            f"{final}: the run wrote {', '.join(strays)}, which is not one of its outputs; "
            "nothing was moved in (please report this)"
        )
    present = marker["present"]
    old = [n for n in present if replace or n in new]
    kept = {n: h for n, h in present.items() if n not in old}
    aside, moved_out, moved_in, made = work / "old", [], [], []
    try:
        _write_marker(final, run, present, new)
        aside.mkdir()
        for name in sorted(old, key=lambda n: (not _record_last(n), n)):  # the records first
            if _identity(final / name) != marker["identity"][name]:
                raise OutputError(
                    f"{final / name} changed while the run was working: it is no longer the file "
                    "LungGradCAM wrote, so the run leaves it and its outputs; run again"
                )
            (aside / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(final / name, aside / name)
            moved_out.append(name)
        for name in sorted(new, key=lambda n: (_record_last(n), n)):  # the records last
            made += _make_parents(final, name)
            try:
                _move_in(staging / name, final / name)
            except FileExistsError:
                raise _not_ours(final, [name]) from None
            moved_in.append(name)
        emptied = {"/".join(n.split("/")[:depth]) for n in old for depth in range(1, n.count("/") + 1)}
        for folder in sorted(emptied, key=lambda f: -f.count("/")):  # innermost first
            with contextlib.suppress(OSError):  # not empty: new files went into it
                (final / folder).rmdir()
        _write_marker(final, run, {**kept, **new})
    except BaseException:
        for name in reversed(moved_in):
            with contextlib.suppress(OSError):
                os.replace(final / name, staging / name)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        for name in moved_out:
            with contextlib.suppress(OSError):
                (final / name).parent.mkdir(parents=True, exist_ok=True)
                _move_in(aside / name, final / name)
        with contextlib.suppress(OSError):
            _write_marker(final, marker["run"], present)
        raise


#: The errors of a write that the disk or the system refused (not a bug, not a missing input).
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def work_folder(out: "str | os.PathLike[str]") -> Path:
    """The staging folder :func:`output_folder` yields for ``out``: where the other processes of
    the same run (``torchrun`` ranks) find what its first process prepared there."""
    return Path(out) / WORK / "new"


def _has_entries(folder: Path) -> bool:
    try:
        return any(os.scandir(folder))
    except OSError:
        return False


@contextlib.contextmanager
def output_folder(
    out: "str | os.PathLike[str]",
    inputs: Sequence["str | os.PathLike[str]"] = (),
    names: Collection[str] = (),
    *,
    exclusive: bool = True,
    replace: bool = True,
    wait: bool = False,
    keep: bool = False,
    resume: bool = False,
) -> Iterator[Path]:
    """Own ``out`` for one run that writes files named among ``names`` (paths relative to it, see
    the module doc): checked (:func:`check_output_folder`), made, locked (a second run into it
    raises :class:`FolderBusyError`; with ``wait`` it waits for the first), cleared of the work
    folder a killed run left; yields a fresh staging folder to write the run's files into
    (subfolders too). On success they replace the outputs the folder's marker vouches for (all of
    them with ``replace``, else those of the same names) (:func:`_commit`); on error nothing in
    ``out`` changes, and a folder the run made is removed again.

    A long run (training) may pass ``keep``: on an error or an interruption its staging folder
    stays in the work folder, vouched for by the marker, while the outputs stay as they were; a
    later run with ``resume`` is given that staging folder again, and without one a staging
    folder that starts as a copy of the folder's outputs (so it goes on from its last complete
    run). A run without ``resume`` clears it. Nested use for the same folder in this process
    yields the same staging folder."""
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
    run, first, claimed, done = secrets.token_hex(16), False, False, False
    work, staging = final / WORK, work_folder(final)
    try:
        try:
            marker, foreign, others = _ownership(final, names, exclusive)  # again, now that no other run can change it
            if foreign:
                raise _not_ours(final, foreign, others)
            claimed = True
            if marker is None or marker["run"] is None:
                (final / MARKER).unlink(missing_ok=True)  # an empty one: a run killed as it made it
                first, marker = True, {"run": run, "present": {}, "identity": {}}
                _first_marker(final, run)
            if resume and _is_folder(staging):  # kept by a failed run (its work folder is vouched for)
                shutil.rmtree(work / "old", ignore_errors=True)
                for name in _files(staging):  # a temporary that a killed write left there
                    if not _allowed(name, names):
                        (staging / name).unlink()
            else:
                shutil.rmtree(work, ignore_errors=True)  # what a killed run left (the marker vouches for it)
                staging.mkdir(parents=True)
                for name in marker["present"] if resume else ():  # go on from the last complete run
                    (staging / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(final / name, staging / name, follow_symlinks=False)
        except OSError as exc:  # a full disk, a folder made read-only meanwhile
            raise OutputError(f"{final}: cannot write there ({exc.strerror}); choose another output folder") from None
        _OWNED[key] = staging
        try:
            yield staging
        except OSError as exc:  # a full disk, a file size limit, a folder made read-only meanwhile
            if exc.errno not in _WRITE_ERRORS:
                raise
            raise OutputError(
                f"{final}: cannot write the outputs ({exc.strerror}); free space or choose another "
                "output folder; the folder is as it was"
            ) from None
        try:
            _commit(final, marker, run, replace, names)
        except OSError as exc:
            raise OutputError(
                f"{final}: cannot move the outputs into place ({exc.strerror}); the folder is as it was"
            ) from None
        done = True
    finally:
        _OWNED.pop(key, None)
        # the replaced outputs go too, unless a failed run could not move them back (the next run
        # into the folder clears them); a failed run's staging folder stays only when it is kept
        left_over = not done and _has_entries(work / "old")
        kept = not done and keep and _has_entries(staging)
        if claimed and not (left_over or kept):
            shutil.rmtree(work, ignore_errors=True)
        elif claimed and not kept:
            shutil.rmtree(staging, ignore_errors=True)
        elif claimed and not left_over:
            shutil.rmtree(work / "old", ignore_errors=True)
        if first and not done and not os.path.lexists(work):
            (final / MARKER).unlink(missing_ok=True)
        _unlock(final, fd)
        if made:
            with contextlib.suppress(OSError):
                final.rmdir()  # only when empty: the run failed before writing anything
