"""A cohort: every CT series of a DICOM tree or Slicer DICOM database, resumably, sharded under torchrun."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

from ..core.atomic import check_output_folder, output_folder, read_record, write_json, write_text
from ..core.errors import (
    DatabaseError,
    DicomDecodeError,
    DicomError,
    FolderBusyError,
    InvalidInputError,
    LungGradCAMError,
    ResourceError,
    VolumeError,
)
from ..core.volume import Volume
from ..io.inputs import check_input, input_tree, is_database
from ..options import ExplainOptions
from .cost import CostEstimate
from .explainer import check_options
from .outputs import OUTPUT_FILES, run_one

log = logging.getLogger(__name__)

#: A DICOM UID (PS3.5 9.1): up to 64 characters, components of digits without leading zeros.
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def safe_name(text: str, fallback: str = "series") -> str:
    """A file-system-safe folder name from a SeriesInstanceUID (no separators, dots kept, <= 64).

    A valid UID is kept as it is: digits and dots, so it is never the name of a batch's own files
    (``summary.csv``, ``.lunggradcam.json``). Any other text (a part key ``<uid>#2``, a hostile
    "UID" such as ``../x`` or ``summary.csv``, more than 64 characters) gets a hash of the whole
    text appended, so that two different UIDs never share a folder and none is a file of the batch."""
    text = str(text)
    name = re.sub(r"[^0-9A-Za-z._-]", "_", text).strip("._")
    if UID_PATTERN.match(text) and len(text) <= 64:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{name[:51] or fallback}-{digest}"


#: The batch's own file in its output folder (each series has a folder of its own).
SUMMARY = "summary.csv"
#: summary.csv's columns: ``output`` is the series' folder inside --out (named by the UID, never by
#: patient), ``input`` where it was read, ``patient_id`` the series' PatientID (as in its DICOM).
SUMMARY_FIELDS = (
    "series_uid",
    "patient_id",
    "status",
    "predicted_class",
    "target_probability",
    "outcome",
    "n_regions",
    "largest_region_ml",
    "peak_cam",
    "seconds",
    "output",
    "input",
    "error",
)


@dataclass
class _SeriesJob:
    uid: str
    load: Callable[[], Volume]
    input: str  #: where the series is read from: its folder, or the database and UID
    patient_id: str = ""


def _unreadable_load(message: str) -> Callable[[], Volume]:
    def load() -> Volume:
        raise DicomDecodeError(
            f"{message}. It lies among this series' files and may be one of its slices: "
            "repair or remove it, then run again with --redo-failed"
        )

    return load


def _list_ct_series(source: Union[str, os.PathLike]) -> List[_SeriesJob]:
    """Every CT series of a DICOM tree or a Slicer DICOM database, sorted by SeriesInstanceUID.

    A file of the tree that cannot be read does not stop the listing: the series whose files share
    its folder fail with its message (it may be one of their slices); one in a folder of its own
    is logged."""
    path = check_input(source)
    if is_database(path):
        from ..io.ctkdb import DicomDatabase

        db = DicomDatabase(path)
        patient_ids = {p.uid: p.patient_id for p in db.patients()}
        patient_of_study = {s.study_uid: patient_ids.get(s.patient_uid, "") for s in db.studies()}
        jobs = [
            _SeriesJob(
                s.series_uid,
                (lambda uid=s.series_uid: db.load(uid)),
                f"{db.path} series {s.series_uid}",
                patient_of_study.get(s.study_uid, ""),
            )
            for s in db.ct_series()
        ]
    else:
        from ..io.dicom import load_dicom_series
        from ..io.dicom_series import list_dicom_series

        unreadable: Dict[Path, str] = {}
        series = [s for s in list_dicom_series(path, unreadable=unreadable) if s.modality.upper() == "CT"]
        jobs = []
        for s in series:
            bad = [message for f, message in unreadable.items() if f.parent in {g.parent for g in s.files}]
            load = (
                _unreadable_load(bad[0])
                if bad
                else (lambda files=list(s.files), key=s.key: load_dicom_series(files, key))
            )
            jobs.append(
                _SeriesJob(s.key, load, os.path.commonpath([str(Path(f).parent) for f in s.files]), s.patient_id)
            )
        placed = {g.parent for s in series for g in s.files}
        for f, message in unreadable.items():
            if f.parent not in placed:
                log.warning("skipped: %r", message)
    if not jobs:
        raise InvalidInputError(f"{path}: no CT series found")
    return sorted(jobs, key=lambda j: j.uid)


def _record(path: Path) -> Optional[dict]:
    """A run's record (``report.json``, ``error.json``), or None when missing, unreadable or not
    one LungGradCAM wrote (its folder's marker vouches for it)."""
    return read_record(path.parent, path.name, OUTPUT_FILES)


def _summary_row(job: _SeriesJob, out_dir: Path, key: Dict[str, Any]) -> Dict[str, Any]:
    """The series' row: "done" from its report, "failed" from its error.json, when made with the
    result options ``key`` (a record of a run with other options, which a failed attempt leaves
    beside its error, says nothing about this run: "pending" when neither is this run's)."""
    folder = out_dir / safe_name(job.uid)
    row: Dict[str, Any] = {k: "" for k in SUMMARY_FIELDS}
    row.update(
        series_uid=job.uid,
        patient_id=getattr(job, "patient_id", ""),
        output=folder.name,
        input=job.input,
        status="pending",
    )
    r, error = _record(folder / "report.json"), _record(folder / "error.json")
    r = r if r is not None and r.get("result_key") == key else None
    error = error if error is not None and error.get("result_key") == key else None
    if r is not None:
        regions = r.get("regions") or []
        row.update(
            status="done",
            predicted_class=r["predicted_class"],
            target_probability=f"{r['probabilities'].get(r['target_class'], float('nan')):.4f}",
            outcome=r.get("outcome", ""),
            n_regions=len(regions),
            largest_region_ml=f"{max((g['volume_ml'] for g in regions), default=0.0):.3f}",
            peak_cam=f"{max((g['peak_cam'] for g in regions), default=0.0):.3f}",
            seconds=f"{r['timings_s'].get('total', 0.0):.2f}",
        )
    elif error is not None:
        row.update(status="failed", error=error.get("error", ""))
    return row


def spreadsheet_cell(value: Any) -> Any:
    """``value`` as a CSV cell a spreadsheet shows and never runs as a formula: text starting with
    ``=``, ``+``, ``-``, ``@`` (or a tab or carriage return) gets a leading apostrophe, as OWASP
    advises; a number stays as it is. (Series UIDs, folder names and error messages come from
    the files.)"""
    text = str(value)
    if text[:1] not in ("=", "+", "-", "@", "\t", "\r"):
        return value
    try:
        float(text)
        return value
    except ValueError:
        return "'" + text


def write_summary(jobs: Sequence[Any], out_dir: Path, key: Dict[str, Any]) -> Path:
    """``summary.csv`` from what is on disk (so it is whole after any interruption): each series'
    result with the result options ``key`` (:func:`run_batch`'s)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS)
    writer.writeheader()
    for job in jobs:
        writer.writerow({k: spreadsheet_cell(v) for k, v in _summary_row(job, out_dir, key).items()})
    with output_folder(out_dir, names=(SUMMARY,), exclusive=False, replace=False, wait=True) as staging:
        write_text(staging / SUMMARY, buf.getvalue())  # one writer at a time (it waits for another)
    return out_dir / SUMMARY


def prefetched(loads: Sequence[Callable[[], Any]]) -> Iterator["Future"]:  # noqa: F821
    """The futures of ``loads``, in order, each run in one background thread: load n + 1 starts
    when future n is handed out, so reading the next series overlaps explaining this one. A
    load's error comes out of its future's ``result()``."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="lgc-read")
    try:
        upcoming = pool.submit(loads[0]) if loads else None
        for n in range(len(loads)):
            current, upcoming = upcoming, (pool.submit(loads[n + 1]) if n + 1 < len(loads) else None)
            yield current
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


#: Why a batch skips a series (:func:`run_batch`'s ``skipped``).
SKIP_DONE = "already done with the same options and model"
SKIP_FAILED = "failed before with the same options for a reason of its own data (--redo-failed retries it)"


def _skip_reason(folder: Path, key: Dict[str, Any], redo_failed: bool) -> Optional[str]:
    """Why a run with result options ``key`` skips the series in ``folder`` (None: it does it):
    :data:`SKIP_DONE` when its report has these options, :data:`SKIP_FAILED` when it failed with
    them for a reason of its own data (its error.json says no ``retry``) and not ``redo_failed``."""
    report, error = _record(folder / "report.json"), _record(folder / "error.json")
    if report is not None:
        return SKIP_DONE if report.get("result_key") == key else None
    if error is not None and error.get("result_key") == key and not error.get("retry") and not redo_failed:
        return SKIP_FAILED
    return None


def run_batch(
    source: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    options: Optional[ExplainOptions] = None,
    *,
    dicom_seg: bool = False,
    volume_format: str = "nrrd",
    redo_failed: bool = False,
    show_progress: bool = True,
    on_estimate: Optional[Callable[[CostEstimate], Optional[bool]]] = None,
    skipped: Optional[Dict[str, int]] = None,
    overlay: bool = True,
    lungs: bool = True,
) -> Path:
    """Explain every CT series of ``source`` into ``out_dir/<SeriesInstanceUID>/`` with ``options``.

    Resumable: a series whose ``report.json`` was made with the same result options, outputs and
    model (``result_key`` in the report: :meth:`ExplainOptions.result_options` without the model's
    name, ``dicom_seg`` and ``volume_format``, plus the weights' SHA-256) is skipped; a series done
    with other options is done again. A series whose data fails (DICOM, volume or database errors)
    is recorded in its ``error.json`` with that key and the rest go on; later runs with the same
    key skip it unless ``redo_failed``, and a run with other options (e.g. without ``dicom_seg``,
    when it was the DICOM SEG that the series could not give) tries it again. A failure
    that is not the series' own is never recorded for good: the options and the model are checked
    before the first series, an error of the run's options or output folder stops the batch, and
    a series that ran out of memory or failed unexpectedly is recorded to be retried by the next
    run. A series whose folder another process is writing is left to it. The next series is read
    (a background thread) while the current one is explained. Under ``torchrun`` (``WORLD_SIZE``
    > 1) rank r takes series r, r+N, ...; rank 0 writes ``summary.csv`` after all ranks finish.
    ``skipped`` (a dict), when given, gets the number of series this rank skipped per reason
    (:data:`SKIP_DONE`, :data:`SKIP_FAILED`). ``overlay``, ``lungs``: write each series'
    ``overlay.png`` and lung mask. Returns the summary's path.
    """
    import datetime

    from tqdm import tqdm

    from ..engine.distributed import barrier, init_torchrun, torchrun_env

    options = ExplainOptions() if options is None else options
    rank, world, _ = torchrun_env()
    out = check_output_folder(out_dir, [input_tree(source)], (SUMMARY,), exclusive=False)
    jobs = _list_ct_series(source)
    if world > 1:  # gloo: the ranks only wait for each other, for as long as the cohort takes
        init_torchrun("gloo", timeout=datetime.timedelta(days=7))
    loaded = check_options(options)  # once, before any series: a wrong option stops the batch here
    key = {
        **{k: v for k, v in options.result_options().items() if k != "model"},
        "model_sha256": loaded.card.sha256,
        "dicom_seg": dicom_seg,
        "volume_format": volume_format,
    }
    out.mkdir(parents=True, exist_ok=True)
    reasons = {job.uid: _skip_reason(out / safe_name(job.uid), key, redo_failed) for job in jobs[rank::world]}
    todo = [job for job in jobs[rank::world] if reasons[job.uid] is None]
    if skipped is not None:
        for reason in filter(None, reasons.values()):
            skipped[reason] = skipped.get(reason, 0) + 1
    progress_bar = tqdm(
        todo, desc=f"series (rank {rank})" if world > 1 else "series", unit="series", disable=not show_progress or None
    )
    for job, volume in zip(progress_bar, prefetched([job.load for job in todo])):
        folder = out / safe_name(job.uid)
        try:
            run_one(
                volume.result,
                folder,
                options,
                dicom_seg=dicom_seg,
                volume_format=volume_format,
                input_desc=job.input,
                report_extra={"result_key": key},
                on_estimate=on_estimate,
                overlay=overlay,
                lungs=lungs,
            )
        except FolderBusyError:
            log.warning("series %r: another process is writing its folder; left to it", job.uid)
        except Exception as exc:  # noqa: BLE001 - one bad series must not stop the cohort
            data = isinstance(exc, (DicomError, VolumeError, DatabaseError))
            if isinstance(exc, LungGradCAMError) and not data and not isinstance(exc, ResourceError):
                raise  # the run's options or output folder: every series would fail alike; record nothing
            log.warning("series %r failed: %r", job.uid, str(exc))  # repr: no raw control characters
            info = {
                "series_uid": job.uid,
                "error": str(exc),
                "type": type(exc).__name__,
                "user_error": isinstance(exc, LungGradCAMError),
                "retry": not data,
                "result_key": key,
            }
            try:
                with output_folder(folder, names=OUTPUT_FILES, replace=False) as staging:  # beside its outputs
                    write_json(staging / "error.json", info)
            except FolderBusyError:
                log.warning("series %r: another process is writing its folder; left to it", job.uid)
    barrier()
    summary = out / SUMMARY
    if rank == 0:
        summary = write_summary(jobs, out, key)
    if world > 1:
        import torch.distributed as dist

        barrier()
        dist.destroy_process_group()
    return summary
