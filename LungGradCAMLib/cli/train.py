"""``lunggradcam train``: parse the options into a :class:`DataSpec`, a :class:`ModelCard` and a
:class:`TrainConfig`, and call :func:`~LungGradCAMLib.training.train.train_and_evaluate`."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from pathlib import Path

from ..core.atomic import check_output_folder, output_folder, strict_json, work_folder
from ..core.errors import InvalidInputError, ModelError
from ..engine.methods import DEFAULT_METHOD
from ..options import METHODS
from ..training.sources import DataSpec, load_data
from .common import argument_type, device
from .data import add_data_arguments, data_spec, json_object


def add_cli(subparsers: "argparse._SubParsersAction") -> None:
    """Register ``lunggradcam train``."""
    p = subparsers.add_parser(
        "train",
        help="train a 3D CNN (single process, or multi-GPU/multi-node under torchrun)",
        description="Train a 3D CNN classifier on labelled CT patches and write best/last checkpoints "
        "(.safetensors + model card .json), log.jsonl, and a held-out evaluation "
        "(report.json, roc.png, loss.png). Patients never cross splits. Run under "
        "`torchrun --nproc_per_node N -m LungGradCAMLib.cli train ...` for DDP.",
    )
    add_data_arguments(p, default_seeds="0-63")
    m = p.add_argument_group("model")
    m.add_argument(
        "--arch",
        default="gradcam3d_cnn",
        help="gradcam3d_cnn, small3d_cnn, resnet18_3d or region_net (a region model: members at one or "
        "more scales, test-time flips, image features fused; with --folds K its members are the "
        "folds' models and the bundle is region.safetensors, see README)",
    )
    m.add_argument(
        "--arch-kwargs",
        default={},
        type=argument_type(json_object),
        help="architecture arguments as JSON, e.g. '{\"width\": 8}'",
    )
    m.add_argument(
        "--patch-size",
        type=int,
        nargs=3,
        default=[32, 32, 32],
        metavar=("K", "J", "I"),
        help="patch size in voxels (default 32 32 32)",
    )
    m.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=[1.5, 1.5, 1.5],
        metavar=("I", "J", "K"),
        help="voxel spacing in mm (default 1.5 1.5 1.5)",
    )
    m.add_argument(
        "--hu-window",
        type=float,
        nargs=2,
        default=[-1000.0, 400.0],
        metavar=("LOW", "HIGH"),
        help="HU window (default -1000 400)",
    )
    m.add_argument("--normalisation", choices=("minmax", "zscore"), default="minmax")
    m.add_argument(
        "--activation",
        choices=("softmax", "sigmoid"),
        default="softmax",
        help="softmax + cross-entropy, or sigmoid + binary cross-entropy",
    )
    m.add_argument("--cam-class", help="class the CAM explains by default (default: the last class)")
    m.add_argument("--target-layer", help="CAM layer, '+' fuses several (default: the architecture's)")
    m.add_argument(
        "--cam-method",
        default=DEFAULT_METHOD,
        choices=METHODS,
        metavar="METHOD",
        help=f"the card's CAM method, used when a run does not choose one (default {DEFAULT_METHOD})",
    )
    m.add_argument(
        "--name",
        default=None,
        help="model name written in the card and the plots' titles (default: the --out folder's name)",
    )
    m.add_argument("--version", default="1.0.0", help="model version written in the card")
    o = p.add_argument_group("training")
    o.add_argument(
        "--out",
        required=True,
        help="output folder, outside the data (created; a previous training's "
        "outputs there are replaced when this one has finished; one "
        "holding other files is refused)",
    )
    o.add_argument("--epochs", type=int, default=30)
    o.add_argument("--batch-size", type=int, default=32)
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--patience", type=int, default=8, help="early-stopping patience in epochs (default 8)")
    o.add_argument("--no-augment", action="store_true", help="switch off 3D augmentation")
    o.add_argument(
        "--contrast-hu",
        type=float,
        default=0.0,
        help="augmentation: half the patches get their tissue outside the nodule enhanced by up to this "
        "many HU, as contrast medium does to vessels (e.g. 600; default 0: off)",
    )
    o.add_argument("--no-amp", action="store_true", help="switch off mixed precision on CUDA")
    o.add_argument(
        "--init",
        metavar="MODEL",
        help="start from this model's weights (name or path; same architecture) instead of random ones: fine-tuning",
    )
    o.add_argument(
        "--mask-loss",
        type=float,
        default=0.0,
        help="weight of the attention head's loss against the lesion outlines of the data (lidc-vois: "
        "the readers' masks, a training target only, never an input; default 0: off)",
    )
    o.add_argument(
        "--folds",
        type=int,
        default=0,
        help="k-fold patient-wise cross-validation instead of one split (k models, CIs across folds)",
    )
    o.add_argument("--val-fraction", type=float, default=0.15, help="patients for validation (default 0.15)")
    o.add_argument("--test-fraction", type=float, default=0.15, help="patients held out for testing (default 0.15)")
    o.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted training into --out from its last epoch (or a finished one from its resume.pt)",
    )
    o.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    o.add_argument(
        "--device",
        default=None,
        type=argument_type(device),
        help="auto (CUDA: cuda:LOCAL_RANK under torchrun; else MPS; else CPU), cpu, cuda, cuda:N, mps",
    )
    o.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    p.set_defaults(func=_run)


def _card(args: argparse.Namespace, spec: DataSpec) -> "ModelCard":  # noqa: F821
    """The model card of the options: architecture, patch, preprocessing, classes, and what the
    training data makes of its description and intended use."""
    from ..engine.models import ARCHITECTURES, ModelCard, build_model

    classes = spec.class_names()
    kwargs = dict(args.arch_kwargs)
    kwargs.setdefault("num_classes", len(classes))
    if args.arch == "region_net":  # its image features read HU and mm from the card's window and grid
        kwargs.setdefault("hu_window", list(args.hu_window))
        kwargs.setdefault("voxel_mm", float(args.spacing[0]))
    build_model(args.arch, **kwargs)  # unknown architecture/arguments fail here, before any data work
    card = ModelCard(
        architecture=args.arch,
        kwargs=kwargs,
        class_names=classes,
        cam_class=args.cam_class or classes[-1],
        target_layer=args.target_layer or ARCHITECTURES[args.arch].cam_layer,
        patch_size=list(args.patch_size),
        spacing_mm=list(args.spacing),
        hu_window=list(args.hu_window),
        normalisation=args.normalisation,
        activation=args.activation,
        name=args.name or Path(args.out).resolve().name,
        version=args.version,
        cam_method=args.cam_method,
    )
    try:
        card.validate("--arch/--cam-class/...")
    except ModelError as exc:
        raise InvalidInputError(str(exc)) from None
    card.training = {
        "data": spec.describe(),
        "data_spec": spec.to_dict(),
        "command": "lunggradcam " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    card.description = f"{card.architecture} {card.kwargs} {' vs '.join(classes)} patch classifier"
    if args.arch == "region_net":
        step = float(args.spacing[0])
        views = " and ".join(f"{c * step:g} mm at {f * step:g} mm" for c, f in kwargs.get("views", []))
        card.description = (
            f"region_net: {' vs '.join(classes)} classifier of a {args.patch_size[0] * args.spacing[0]:g} mm "
            f"region ({args.patch_size[0]}^3 voxels at {args.spacing[0]:g} mm) centred on ONE lung "
            f"nodule; gradcam3d_cnn members {kwargs.get('member', {})} seeing {views}, "
            f"{kwargs.get('flips', 1)} mirror image(s) each, their logits averaged"
            + (f", image features {kwargs['features']} fused" if kwargs.get("features") else "")
        )
    if classes == ["benign", "malignant"]:  # judges one nodule: explained on a region, never a whole scan
        card.input = "roi"
    if args.arch == "region_net":
        card.cam_method = "layercam"
    if spec.source == "phantom":
        card.intended_use = (
            "Trained on synthetic chest CT phantoms only: for demonstration and testing, "
            "not for clinical use. Train on real data with `lunggradcam train` for research."
        )
    elif card.input == "roi":
        card.intended_use = (
            "Research only, not for clinical use. Takes a region around ONE lung nodule (an "
            "ROI centred on it), not a whole scan, and scores how malignant-looking it is."
        )
    return card


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..engine.distributed import barrier, init_torchrun
    from ..training.train import TRAIN_FILES, TrainConfig, train_and_evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = data_spec(args, (args.val_fraction, args.test_fraction))
    card = _card(args, spec)
    region = args.arch == "region_net" and args.folds
    inputs = [p for p in (args.path, args.backgrounds, args.cache) if p]
    if not region:  # a region ensemble's folder is its own (members shared by processes, resumed by their files)
        check_output_folder(args.out, inputs, TRAIN_FILES)  # before any work: an unusable --out fails now
    data = load_data(spec, card)
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        augment=not args.no_augment,
        contrast_hu=args.contrast_hu,
        amp=not args.no_amp,
        seed=args.seed,
        init=args.init,
        mask_loss=args.mask_loss,
    )
    if region:
        from ..training.region import train_region_model

        result = train_region_model(
            data,
            card,
            args.out,
            config,
            folds=args.folds,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            progress=not args.no_progress,
            device=args.device,
        )
        if result.test_report:  # else another process bundled the members
            print(
                strict_json(
                    {
                        "region_model": str(result.path),
                        "test": {k: round(v["value"], 4) for k, v in result.test_report["metrics"].items()},
                        "cv": {k: round(v["value"], 4) for k, v in result.cv_report["model"]["metrics"].items()},
                    }
                )
            )
        return 0
    # --out is owned as run's is; training works in its work folder, which an interrupted run
    # leaves for --resume, and its results replace the folder's outputs only when it has finished
    # (README, "Reliability and security"). Rank 0 owns it; the other ranks work in the same place.
    rank = init_torchrun()[0]
    owned = (
        output_folder(args.out, inputs, TRAIN_FILES, keep=True, resume=args.resume)
        if rank == 0
        else contextlib.nullcontext(work_folder(args.out))
    )
    with owned as work:
        barrier()  # rank 0 has made the work folder (with the state to resume) before the others read it
        results = train_and_evaluate(
            data,
            card,
            work,
            config,
            folds=args.folds,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            resume=args.resume,
            progress=not args.no_progress,
            device=args.device,
        )
    if rank == 0:
        for r in results:
            print(
                strict_json(
                    {
                        "fold": r.name or "holdout",
                        "best_epoch": r.fit.best_epoch,
                        **{k: round(v["value"], 4) for k, v in r.report["metrics"].items()},
                    }
                )
            )
    return 0
