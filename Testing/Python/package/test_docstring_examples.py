"""The short example in the docstring of each main entry point runs as written (doctest), in an
empty folder, so the documented calls and what they print cannot drift from the code."""

from __future__ import annotations

import doctest

import pytest

import LungGradCAMLib as lgc

#: The entry points a user starts from (DESIGN's public API), each with an example.
ENTRY_POINTS = (
    "load_dicom_series",
    "DicomDatabase",
    "read_volume",
    "load_model",
    "lung_mask",
    "explain",
    "segment_cam",
    "write_segmentation",
)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_the_entry_points_example_runs_as_written(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write their files (dicom/, ct.nrrd...) here
    found = doctest.DocTestFinder(recurse=False).find(getattr(lgc, name), name, globs={})
    assert found and found[0].examples, f"lgc.{name} has no example in its docstring"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(found[0])
    assert runner.summarize(verbose=False).failed == 0, f"lgc.{name}'s example does not run as written (above)"
