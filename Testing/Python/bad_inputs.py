"""What the bad-input tests share: small damaged, unusable and odd inputs that a hospital folder can
hold, generated here (no patient data is committed), and how a case is checked. The cases live with
the part each attacks: io/test_bad_dicom.py (DICOM series), io/test_bad_database.py (Slicer's DICOM
database), io/test_bad_volume_files.py (NRRD, NIfTI, MetaImage), io/test_special_files.py (a FIFO, a
device, /dev/stdin), pipeline/test_bad_out.py (the output folder), cli/test_bad_options.py (options
and paths) and core/test_memory_bombs.py (small files that declare huge work).

For every failing case:
  (a) the library call raises its specific :class:`LungGradCAMError` subclass with a message that
      names the problem and the file, folder or series;
  (b) ``lunggradcam run INPUT --out OUT`` returns 2, prints that message on stderr without a
      traceback and leaves no output (OUT is not created);
  (c) every file of the input is byte-identical afterwards (and no file appears or disappears).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pydicom
import pytest

from LungGradCAMLib.cli import main
from LungGradCAMLib.core.errors import LungGradCAMError
from LungGradCAMLib.core.volume import Volume, axis_aligned_matrix
from LungGradCAMLib.io.dicom_write import write_dicom_series

from helpers import snapshot

AXIAL = axis_aligned_matrix((0.8, 0.8, 2.5), (-10.0, 20.0, -40.0))


def random_hu(shape=(4, 16, 16), seed=0) -> np.ndarray:
    return np.rint(np.random.default_rng(seed).normal(-300, 300, shape)).clip(-1000, 2000).astype(np.float32)


def dicom_series(folder: Path, shape=(4, 16, 16), seed=0, matrix=AXIAL, **kwargs) -> List[Path]:
    return write_dicom_series(Volume(random_hu(shape, seed), matrix), folder, **kwargs)


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


@dataclass
class Made:
    """A built bad input: what ``lunggradcam run`` gets, the library call that must fail (or
    succeed), and strings (file, folder, series) the message must contain."""

    input: Path
    call: Callable[[], Any]
    names: List[str] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)


@dataclass
class Case:
    make: Callable[[Path], Made]
    error: type
    text: str  # regular expression the message must match


NRRD_HEADER = (
    "NRRD0004\ntype: short\ndimension: {dim}\nspace: left-posterior-superior\nsizes: {sizes}\n"
    "space directions: {dirs}\nendian: little\nencoding: raw\nspace origin: ({origin})\n\n"
)


def build(case: Case, tmp_path: Path, monkeypatch) -> Made:
    made = case.make(tmp_path / "in")
    for key, value in made.env.items():
        monkeypatch.setenv(key, value)
    return made


def case_tests(cases: Dict[str, Case]):
    """The two tests every failing case of ``cases`` gets, for a test module to bind to its own
    names: (a) and (c) on the library call, (b) and (c) on ``lunggradcam run``."""

    @pytest.mark.parametrize("name", list(cases))
    def test_library_raises_specific_error_naming_the_input(name, tmp_path, monkeypatch):
        case = cases[name]
        made = build(case, tmp_path, monkeypatch)
        before = snapshot(tmp_path / "in")
        with pytest.raises(case.error, match=case.text) as err:
            made.call()
        assert isinstance(err.value, LungGradCAMError)
        for text in made.names:
            assert text in str(err.value), f"{text!r} not named in: {err.value}"
        assert "TOPSECRET" not in str(err.value)
        assert snapshot(tmp_path / "in") == before

    @pytest.mark.parametrize("name", list(cases))
    def test_cli_exits_2_with_the_message_and_writes_nothing(name, tmp_path, monkeypatch, capsys, tiny):
        case = cases[name]
        made = build(case, tmp_path, monkeypatch)
        before = snapshot(tmp_path / "in")
        out = tmp_path / "out"
        with warnings.catch_warnings(record=True) as caught:  # one message, no RuntimeWarning beside it
            warnings.simplefilter("always")
            code = main(["run", str(made.input), "--out", str(out), "--model", str(tiny), "--device", "cpu"])
        captured = capsys.readouterr()
        assert code == 2, captured.err
        assert "Traceback" not in captured.err + captured.out and "TOPSECRET" not in captured.err
        assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
        assert captured.err.startswith("lunggradcam run: error: ")
        with pytest.raises(case.error) as err:  # the library's own message reaches the user, whole
            made.call()
        assert str(err.value) in captured.err
        assert not out.exists(), sorted(p.name for p in out.rglob("*"))
        assert snapshot(tmp_path / "in") == before

    return test_library_raises_specific_error_naming_the_input, test_cli_exits_2_with_the_message_and_writes_nothing


def within(seconds: float, fn: Callable[[], Any], root: Path) -> Any:
    """``fn()`` in a thread; if it has not returned after ``seconds``, open every FIFO under ``root``
    for writing (which releases a reader blocked on it) and fail."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for p in root.rglob("*"):
            if p.is_fifo():
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(30)
        pytest.fail(f"blocked for more than {seconds} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def run_cli(ct: Path, out: Path, model: Path, *extra: str, command: str = "run") -> int:
    """``lunggradcam run`` in this process; an option argparse refuses gives its exit status."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main([command, str(ct), "--out", str(out), "--model", str(model), "--device", "cpu", *extra])
        except SystemExit as exc:
            code = exc.code
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    return code


def model_variant(tmp: Path, tiny: Path, card: Callable[[dict], Any], weights: Optional[bytes] = None) -> Path:
    """A copy of the tiny model whose card JSON text is ``card(card_dict)`` (and other weights)."""
    path = tmp / "variant.safetensors"
    path.write_bytes(weights if weights is not None else tiny.read_bytes())
    data = json.loads(tiny.with_suffix(".json").read_text())
    data["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    changed = card(data)
    path.with_suffix(".json").write_text(changed if isinstance(changed, str) else json.dumps(changed))
    return path
