"""``lunggradcam dicom-db``: make a Slicer DICOM database (``ctkDICOM.sql``) from a DICOM folder."""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_dicom_db(args: argparse.Namespace) -> int:
    from ..io.ctkdb_write import make_dicom_database

    print(make_dicom_database(args.source, args.out))
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "dicom-db",
        help="make a Slicer DICOM database (ctkDICOM.sql) from a DICOM folder",
        description="Index the DICOM image series under SOURCE into a new ctkDICOM.sql in --out, "
        "with the schema of Slicer's DICOM database (CTK 0.8.1): Slicer's DICOM module "
        "(set --out as its database folder), LungGradCAMLib.DicomDatabase and "
        "'lunggradcam run/batch --out ... DB_FOLDER' open it. The DICOM files are "
        "only read; an existing database is never overwritten.",
    )
    p.add_argument("source", help="DICOM folder (searched recursively)")
    p.add_argument("--out", required=True, help="the database folder (made when missing)")
    p.set_defaults(func=_cmd_dicom_db)
