"""``lunggradcam evaluate``: a model's metrics on labelled patches
(:func:`~LungGradCAMLib.evaluation.evaluate.evaluate_model`), or with ``--cam-retrain`` the
heat-map retraining test (:func:`~LungGradCAMLib.training.cam_retrain.cam_retrain`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import List, Tuple

from ..core.atomic import check_output_folder, output_folder, strict_json
from ..training.sources import load_data
from .common import argument_type, device
from .data import add_data_arguments, data_spec, json_object


def add_cli(subparsers: "argparse._SubParsersAction") -> None:
    """Register ``lunggradcam evaluate``."""
    p = subparsers.add_parser(
        "evaluate",
        help="metrics with 95%% CIs, ROC and loss curves of a model on labelled data",
        description="Evaluate a model on labelled patches: accuracy, precision, recall/sensitivity, "
        "specificity, F1 and ROC AUC with 95% bootstrap CIs (patients resampled), the "
        "confusion matrix, roc.png and report.json (and loss.png from a training log).",
    )
    p.add_argument("--model", default="default", help="model name or .safetensors path (default: default)")
    add_data_arguments(p, from_card=True)
    p.add_argument(
        "--all-patients",
        action="store_true",
        help="score every patient of the data, not only the model card's test patients",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder for report.json, roc.png, loss.png (created; an "
        "earlier evaluation's files there are replaced; one holding other "
        "files is refused)",
    )
    p.add_argument("--log", help="a training log.jsonl to plot as loss curves")
    p.add_argument(
        "--decision-threshold",
        "--threshold",
        dest="decision_threshold",
        type=decision_threshold,
        default=0.5,
        metavar="P",
        help="the probability of the explained class at or above which a patch counts as that class, for "
        "accuracy, sensitivity, specificity and the confusion matrix (default 0.5; --threshold is its "
        "older name: for run and batch, --threshold is a heat-map level)",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (default 1000)")
    p.add_argument(
        "--device",
        default=None,
        type=argument_type(device),
        help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps",
    )
    _add_cam_retrain_arguments(p)
    p.set_defaults(func=_run)


def _add_cam_retrain_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--cam-retrain`` options of ``lunggradcam evaluate``."""
    g = p.add_argument_group("heat-map retraining test (--cam-retrain)")
    g.add_argument(
        "--cam-retrain",
        action="store_true",
        help="instead of evaluating --model, train its architecture (its card: architecture, patch "
        "size, preprocessing) from scratch on the data (the card's by default: phantoms, or real "
        "LIDC nodules with the readers' outlines), then retrain it on inputs multiplied by the CAM, the "
        "truth mask and the inverted truth mask; writes --out/cam_retrain.json",
    )
    g.add_argument("--retrain-epochs", type=int, default=15, help="epochs per training (default 15)")
    g.add_argument("--retrain-patience", type=int, default=5, help="early-stopping patience (default 5)")
    g.add_argument("--retrain-batch-size", type=int, default=32, help="batch size (default 32)")
    g.add_argument("--retrain-lr", type=float, default=1e-3, help="learning rate (default 0.001)")
    g.add_argument(
        "--retrain-arch-kwargs",
        default={},
        type=argument_type(json_object),
        help="JSON merged into the card's architecture arguments, e.g. '{\"width\": 4}'",
    )
    g.add_argument("--retrain-no-augment", action="store_true", help="switch off 3D augmentation")
    g.add_argument("--val-fraction", type=float, default=0.3, help="patients for validation (default 0.3)")
    g.add_argument("--cam-method", help="CAM method for the cam variant (default: the card's cam_method)")
    g.add_argument(
        "--retrain-mask-loss",
        type=float,
        help="weight of the outline loss of models with an attention head (default: the card's training "
        "config); needs data with lesion outlines (lidc-vois)",
    )
    g.add_argument(
        "--mask-dilation",
        type=int,
        default=0,
        help="grow the truth masks by this many voxels first (default 0: the truth as drawn)",
    )
    g.add_argument("--threads", type=int, help="torch CPU threads, also without --cam-retrain (default: torch's)")


def _outputs() -> Tuple[str, ...]:
    """What ``evaluate`` may write into --out: a report (:data:`REPORT_FILES`), or with
    ``--cam-retrain`` the retraining test's files; a run of one kind replaces one of the other."""
    from ..evaluation.evaluate import REPORT_FILES
    from ..training.cam_retrain import CAM_RETRAIN_FILES

    return (*REPORT_FILES, *CAM_RETRAIN_FILES)


def decision_threshold(text: str) -> float:
    """``--decision-threshold``: a probability in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if 0.0 <= value <= 1.0:
        return value
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a probability in [0, 1]: evaluate's decision threshold is the probability at "
        "or above which a patch counts as the explained class (e.g. 0.5)"
    )


def _inputs(args: argparse.Namespace) -> List[str]:
    """The files and folders evaluate reads, which --out may not be, hold or lie in (those given on
    the command line; a data option not given is absent from ``args``)."""
    given = (getattr(args, name, None) for name in ("model", "path", "backgrounds", "cache", "log"))
    return [p for p in given if p and os.path.lexists(p)]


def _run(args: argparse.Namespace) -> int:
    from ..engine.models import load_model
    from ..evaluation.evaluate import METRICS, evaluate_model, read_log, write_report

    check_output_folder(args.out, _inputs(args), _outputs())  # before any work: an unusable --out fails now
    if args.cam_retrain:
        return _run_cam_retrain(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device)
    data, scope, seed = scored_data(args, loaded.card)
    print(f"scoring {scope}", flush=True)
    report = evaluate_model(loaded, data, args.decision_threshold, n_boot=args.bootstrap, seed=seed)
    report["model"] = loaded.card.summary()
    report["scope"] = scope
    report["data"] = {"patches": len(data), "patients": int(len(set(data.patients))), "classes": data.counts()}
    history = read_log(args.log) if args.log else None
    with output_folder(args.out, _inputs(args), _outputs()) as staging:  # replaces an earlier evaluation's files
        written = write_report(report, staging, history, title=loaded.card.name)
    # strict JSON, as report.json: an undefined metric is null
    print(strict_json({k: round(report["metrics"][k]["value"], 4) for k in METRICS}))
    if "diameter_baseline" in report:
        base = report["diameter_baseline"]
        print(
            strict_json(
                {
                    "diameter_baseline": {k: round(base["metrics"][k]["value"], 4) for k in METRICS},
                    "threshold_mm": base["threshold_mm"],
                }
            )
        )
        print(
            strict_json(
                {
                    "roc_auc_by_size": {
                        b["band"]: {
                            "model": round(b["model_roc_auc"]["value"], 4),
                            "diameter": round(b["diameter_roc_auc"]["value"], 4),
                            "n": b["n"],
                        }
                        for b in report["size_bands"]
                    }
                }
            )
        )
    print("wrote " + ", ".join(str(Path(args.out) / path.name) for path in written.values()))
    return 0


def scored_data(args: argparse.Namespace, card: "ModelCard") -> "Tuple[PatchSet, str, int]":  # noqa: F821
    """The patches ``evaluate`` scores, what they are, and the seed (of the data settings, also
    the bootstrap's): the data settings of the command line, else the card's
    (``training.data_spec``); of a source with fixed splits its test part; else the card's test
    patients (``training.split.test_patients``) unless ``--all-patients`` is given or none of them
    is in the data."""
    from dataclasses import replace

    from ..core.errors import DataError

    spec = data_spec(args, card_spec=(card.training or {}).get("data_spec"))
    test = ((card.training or {}).get("split") or {}).get("test_patients") or []
    fixed = spec.source == "lidc-vois" and spec.task == "nodule"
    if test and not fixed and not args.all_patients:
        try:
            data = load_data(replace(spec, patients=test), card)
            return (
                data,
                (
                    f"the model card's {len(set(data.patients))} test patients (training.split.test_patients; "
                    "--all-patients scores every patient)"
                ),
                spec.seed,
            )
        except DataError as exc:
            if "none of the" not in str(exc):
                raise
            note = "none of the model card's test patients is in this data: "
    else:
        note = ""
    data = load_data(spec, card)
    if data.splits is not None:  # the source fixes its splits (background regions): score the test part
        data = data.subset(data.split_index("test"))
        return data, f"the test split the data fixes ({len(set(data.patients))} patients and regions)", spec.seed
    return data, note + f"all {len(set(data.patients))} patients of the data", spec.seed


def _run_cam_retrain(args: argparse.Namespace) -> int:
    """``lunggradcam evaluate --cam-retrain``."""
    import torch

    from ..engine.models import ModelCard, build_model, resolve_model_path
    from ..training.cam_retrain import cam_retrain, phantom_patch_masks
    from ..training.train import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    card = ModelCard.load(resolve_model_path(args.model).with_suffix(".json"))
    card.kwargs = {**card.kwargs, **args.retrain_arch_kwargs}
    build_model(card.architecture, **card.kwargs)  # bad arguments fail before any data work
    spec = data_spec(args, card_spec=(card.training or {}).get("data_spec"))
    data = load_data(spec, card)
    masks = data.masks if data.masks is not None else phantom_patch_masks(data)
    mask_loss = args.retrain_mask_loss
    if mask_loss is None:
        mask_loss = float(((card.training or {}).get("config") or {}).get("mask_loss", 0.0))
    cfg = TrainConfig(
        epochs=args.retrain_epochs,
        batch_size=args.retrain_batch_size,
        lr=args.retrain_lr,
        patience=args.retrain_patience,
        augment=not args.retrain_no_augment,
        seed=spec.seed,
        mask_loss=mask_loss,
    )
    with output_folder(args.out, _inputs(args), _outputs()) as staging:  # moved in when all four have trained
        result = cam_retrain(
            data,
            masks,
            card,
            staging,
            config=cfg,
            val_fraction=args.val_fraction,
            method=args.cam_method or card.cam_method,
            mask_dilation=args.mask_dilation,
            device=args.device,
            seed=spec.seed,
            n_boot=args.bootstrap,
        )
    print(
        strict_json(
            {
                "validation_accuracy": {k: round(v, 4) for k, v in result.accuracy.items()},
                "chance": round(result.chance, 4),
            }
        )
    )
    print(f"wrote {Path(args.out) / 'cam_retrain.json'}")
    return 0
