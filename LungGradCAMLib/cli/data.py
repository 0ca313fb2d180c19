"""The data-source options shared by ``lunggradcam train`` and ``evaluate``, checked as parsed,
and the :class:`~LungGradCAMLib.training.sources.DataSpec` they describe."""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, Optional

from ..core.errors import InvalidInputError
from ..training.sources import SOURCES, DataSpec, parse_seeds
from .common import argument_type


def json_object(text: str) -> Dict[str, Any]:
    """A JSON object given on the command line (e.g. architecture arguments)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"give a JSON object, e.g. '{{\"width\": 8}}'; got {text!r}")
    return value


def add_data_arguments(p: argparse.ArgumentParser, default_seeds: str = "1000-1015", from_card: bool = False) -> None:
    """The data-source options shared by ``train`` and ``evaluate``; ``from_card``: an option not
    given takes the model card's value (its ``training.data_spec``), else the default."""
    g = p.add_argument_group(
        "data"
        + (" (each not given: the model card's training data setting, else the default shown)" if from_card else "")
    )
    g.add_argument(
        "--source",
        choices=SOURCES,
        default="phantom",
        help="phantom: synthetic chest CTs; luna16: a LUNA16 folder (subset*/*.mhd + "
        "annotations.csv/candidates.csv); lidc: a LIDC-IDRI folder (patient folders with "
        "DICOM + reader XML; benign vs malignant); lidc-vois: a LIDC VOI folder (nodules.csv, "
        "image/, nodule_mask/: real nodules with reader masks); manifest: a CSV "
        "(image,label[,patient,x,y,z,space]); patches: a .npz patch cache (default: phantom)",
    )
    g.add_argument("--path", help="the LUNA16/LIDC/VOI folder, manifest CSV or patch cache (not for phantom)")
    g.add_argument(
        "--backgrounds",
        help="lidc-vois: a CSV (image,split) of real CTs whose lungs hold the "
        "placed nodules and give the background patches; split is train, "
        "validation, test or bands (see README)",
    )
    g.add_argument(
        "--placements",
        type=int,
        default=None,
        help="lidc-vois: patches per nodule, each in another background place (default 4 for malignancy, 3 for nodule)",
    )
    g.add_argument(
        "--negatives-per-region",
        type=int,
        default=100,
        help="lidc-vois --task nodule: background patches per kind per background region (default 100)",
    )
    g.add_argument(
        "--with-phantoms",
        metavar="SEEDS",
        default=[],
        type=argument_type(parse_seeds),
        help="lidc-vois --task nodule: also phantom patches of these seeds (e.g. '0-79'), split by seed",
    )
    g.add_argument(
        "--hard-negatives",
        metavar="MODELS",
        default="",
        help="lidc-vois --task nodule: comma-separated models (names or .safetensors paths) whose false hot "
        "spots in each background region become negatives (rounds of hard-negative mining)",
    )
    g.add_argument(
        "--hard-negatives-per-region",
        type=int,
        default=200,
        help="lidc-vois --task nodule: hard negatives per background region and model (default 200)",
    )
    g.add_argument(
        "--hard-negatives-per-phantom",
        type=int,
        default=0,
        help="lidc-vois --task nodule with --with-phantoms: hard negatives per phantom and model (default 0)",
    )
    g.add_argument(
        "--hard-negative-threshold",
        type=float,
        default=0.3,
        help="lidc-vois --task nodule: the heat a false hot spot reaches (absolute scale; default 0.3)",
    )
    g.add_argument(
        "--phantom-seeds",
        default=parse_seeds(default_seeds),
        type=argument_type(parse_seeds),
        help=f"phantom seeds, e.g. '0-63' or '1,2,5-7'; one patient each (default {default_seeds})",
    )
    g.add_argument(
        "--task",
        choices=("nodule", "malignancy"),
        default="nodule",
        help="phantom and lidc-vois labels: nodule vs background, or benign vs malignant nodules (default nodule)",
    )
    g.add_argument(
        "--positives-per-nodule",
        type=int,
        default=6,
        help="phantom patches per nodule (default 6; also for --with-phantoms)",
    )
    g.add_argument(
        "--negatives-per-kind",
        type=int,
        default=4,
        help="phantom background patches per kind per scan (default 4; also for --with-phantoms)",
    )
    g.add_argument(
        "--max-negatives-per-scan", type=int, default=20, help="LUNA16 candidates of class 0 kept per scan (default 20)"
    )
    g.add_argument(
        "--classes",
        default="background,nodule",
        help="class names for manifest/LUNA16 data, index order (default background,nodule)",
    )
    g.add_argument("--cache", help="save/load the patches here (.npz) so a second run skips building them")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling, splits and training (default 0)")
    if from_card:  # absent from the namespace unless given: data_spec() fills them in
        for action in g._group_actions:
            action.default = argparse.SUPPRESS


def _defaults() -> Dict[str, Any]:
    parser = argparse.ArgumentParser(add_help=False)
    add_data_arguments(parser)
    return vars(parser.parse_args([]))


def data_spec(
    args: argparse.Namespace, split_fractions: Any = (0.15, 0.15), card_spec: Optional[Dict[str, Any]] = None
) -> DataSpec:
    """The :class:`DataSpec` of parsed data options; ``split_fractions``: (validation, test) of a
    source with fixed splits. ``card_spec`` (a model card's ``training.data_spec``) fills in the
    options the command line did not give (see ``from_card``), split fractions included."""
    values = _defaults()
    values["split_fractions"] = tuple(split_fractions)
    values.update(card_spec or {})
    values.update({k: v for k, v in vars(args).items() if k in values or k in ("cache", "classes")})
    for key in ("classes", "hard_negatives"):  # comma-separated on the command line
        if isinstance(values.get(key), str):
            values[key] = tuple(c.strip() for c in values[key].split(",") if c.strip())
    return DataSpec.from_dict({k: v for k, v in values.items() if k in DataSpec.DESCRIBING or k == "cache"})
