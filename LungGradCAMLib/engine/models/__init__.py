"""Models: the architecture registry, model files (safetensors + card JSON) and their loading.

A model on disk is ``<name>.safetensors`` (or a torch ``state_dict`` saved as ``.pt``/``.pth``,
read only with ``torch.load(weights_only=True)``) plus ``<name>.json``, its :class:`ModelCard`.
Bundled models live in ``Resources/Models`` (override the folder with ``LUNGGRADCAM_MODELS``).
Nothing here ever unpickles arbitrary objects from a user's file.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import math
import os
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ...core.atomic import atomic_path
from ...core.errors import InvalidInputError, ModelError
from ...core.limits import available_memory, check_bytes, is_out_of_memory, max_model_bytes, out_of_memory
from ...core.paths import check_path, kind, open_regular
from ...core.text import escaped, first_line
from ..cam import probabilities as _probabilities
from ..device import resolve_device
from ..preprocess import apply_card_preprocessing
from .card import ModelCard
from .networks import ARCHITECTURES

__all__ = [
    "ARCHITECTURES",
    "LoadedModel",
    "ModelCard",
    "available_models",
    "build_model",
    "load_model",
    "models_dir",
    "resolve_model_path",
    "save_model",
]

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the architecture registered as ``name`` (see ``ARCHITECTURES``) with ``kwargs``.

    Every network takes (N, C, K, J, I) inputs, returns (N, num_classes) logits (a segmenter:
    (N, num_classes, K, J, I)), and has a ``cam_layer`` attribute naming its default Grad-CAM layer. Unknown names or keyword arguments
    raise :class:`ModelError`.
    """
    cls = ARCHITECTURES.get(name)
    if cls is None:
        raise ModelError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ModelError(f"architecture {name!r} has no argument(s) {unknown}; it takes {sorted(accepted)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot build {name!r} with {escaped(kwargs, 200)}: {first_line(exc)}") from None


def models_dir() -> Path:
    """Folder of bundled models: ``$LUNGGRADCAM_MODELS`` or ``<repo>/Resources/Models``."""
    env = os.environ.get("LUNGGRADCAM_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "Resources" / "Models"


def available_models() -> List[str]:
    """Names of the models in :func:`models_dir` (weights with a card beside them), sorted."""
    folder = models_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.with_suffix(".json").is_file())


def resolve_model_path(path_or_name: "Union[str, os.PathLike[str]]") -> Path:
    """The weights file for a model name (in :func:`models_dir`), a weights path, or a card path."""
    text = os.fspath(path_or_name)
    try:
        path = check_path(text, "model")
    except InvalidInputError as exc:
        raise ModelError(str(exc)) from None
    if path.suffix == ".json":
        for suffix in WEIGHT_SUFFIXES:
            if path.with_suffix(suffix).is_file():
                return path.with_suffix(suffix)
        raise ModelError(f"{path}: no weights beside this card (expected {path.stem}.safetensors)")
    if path.suffix in WEIGHT_SUFFIXES:
        if not path.is_file():
            what = f"a {kind(path.stat().st_mode)}, not a file" if path.exists() else "model weights file not found"
            raise ModelError(f"{path}: {what}")
        return path
    if os.sep in text or (os.altsep and os.altsep in text) or path.suffix:
        raise ModelError(
            f"{text}: not a model file; give a .safetensors/.pt/.pth file, its .json "
            f"card, or a model name ({', '.join(available_models()) or 'none installed'})"
        )
    for suffix in WEIGHT_SUFFIXES:
        candidate = models_dir() / f"{text}{suffix}"
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"unknown model {text!r}; available in {models_dir()}: "
        f"{', '.join(available_models()) or 'none'} (or give a path to a .safetensors file)"
    )


@dataclass
class LoadedModel:
    """A network (eval mode, parameters on ``device``) with its validated card."""

    module: nn.Module
    card: ModelCard

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def target_layers(self) -> List[nn.Module]:
        """The card's CAM layers (several when its ``target_layer`` joins names with ``+``)."""
        return [self.module.get_submodule(name) for name in self.card.target_layer.split("+")]

    @property
    def target_layer(self) -> nn.Module:
        """The card's CAM layer (of several fused ones, the deepest: the last named)."""
        return self.target_layers[-1]

    def prepare(self, hu: torch.Tensor) -> torch.Tensor:
        """HU tensor (N, C, K, J, I) -> model input, windowed and normalised as the card says."""
        return apply_card_preprocessing(hu, self.card)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, classes) logits -> probabilities with the card's activation (:func:`cam.probabilities`)."""
        return _probabilities(logits, self.card.activation)

    #: Bytes of all layers' outputs per input voxel, measured by :func:`load_model`'s probe.
    bytes_per_voxel: float = 0.0

    def activation_bytes(self, patch: Sequence[int]) -> float:
        """Bytes of every layer's output for one input of ``patch`` voxels (K, J, I): at most what
        one sample of a batch holds while its CAM is computed."""
        return self.bytes_per_voxel * float(math.prod(int(p) for p in patch))


def _probe(module: nn.Module, patch: Sequence[int], device: Any) -> Tuple[Tuple[int, ...], int]:
    """(logits shape, bytes of every leaf layer's output) of one zero patch of ``patch`` voxels
    (one channel) through ``module`` on ``device``."""
    total = 0

    def count(_module: nn.Module, _inputs: tuple, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    hooks = [m.register_forward_hook(count) for m in module.modules() if not any(m.children())]
    try:
        with torch.inference_mode():
            logits = module(torch.zeros(1, 1, *[int(p) for p in patch], device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return tuple(logits.shape), total


def sha256_file(path: "Union[str, os.PathLike[str]]") -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(module: nn.Module, card: ModelCard, path: "Union[str, os.PathLike[str]]") -> Path:
    """Write ``module``'s weights to ``path`` (.safetensors) and its card to the same name .json.

    The card's ``sha256`` is set from the written weights; both files are written atomically.
    Returns the weights path.
    """
    from safetensors.torch import save as st_save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelError(f"{path}: save models as .safetensors")
    card.validate(str(path))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    data = st_save(tensors, metadata={"format": "pt", "architecture": card.architecture})
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    card.sha256 = hashlib.sha256(data).hexdigest()
    card.save(path.with_suffix(".json"))
    return path


def _read_state_dict(path: Path) -> dict:
    """Tensors of a weights file, never unpickling code (safetensors, or weights_only torch.load)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"{path}: not a valid safetensors file ({exc})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusals come as UnpicklingError/RuntimeError/...: all mean "bad file"
        raise ModelError(
            f"{path}: refused to load: it is not a plain tensor state_dict "
            f"({type(exc).__name__}: {first_line(exc)}). "
            "Only weights saved with torch.save(model.state_dict()) or safetensors "
            "are accepted; arbitrary pickled objects are never loaded."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: expected a state_dict (name -> tensor), got {type(state).__name__}")
    return state


def _check_declared_size(path: Path, allowed: int) -> None:
    """Refuse weights that are, or unpack to, more than ``allowed`` bytes, before reading them:
    the file itself, and for a torch file (a zip archive, which may hold deflate-compressed
    entries) the sizes its directory declares, which torch allocates as it reads."""
    size = path.stat().st_size
    if size > allowed:
        raise ModelError(
            f"{path}: {size} bytes, more than the {allowed} the card's network can hold; "
            "refusing to read it (is it the card's weights file?)"
        )
    if path.suffix == ".safetensors":
        return  # stored uncompressed: the file size bounds what it holds
    if not zipfile.is_zipfile(path):
        raise ModelError(
            f"{path}: refused to load: not a torch zip archive (torch.save since torch 1.6); the legacy "
            "format is not read: save the state_dict again with a current torch, or as .safetensors"
        )
    with zipfile.ZipFile(path) as archive:
        declared = sum(info.file_size for info in archive.infolist())
    if declared > allowed:
        raise ModelError(
            f"{path}: its entries unpack to {declared} bytes, more than the {allowed} the card's "
            "network can hold; refusing to allocate them"
        )


def load_model(
    path_or_name: "Union[str, os.PathLike[str]]" = "default", device: "Optional[Union[str, torch.device]]" = None
) -> LoadedModel:
    """Load a model by name (``Resources/Models/<name>.safetensors`` + ``.json``) or path.

    Validates, in this order and before allocating anything: the card (fields, known
    architecture, patch size limit), the network's size (built on the meta device; limit
    ``LUNGGRADCAM_MAX_MODEL_BYTES``, default 4 GiB, and the memory the process can get), one
    input channel, the weights file's size and, for a torch zip, the sizes its entries unpack to
    (at most twice the network's bytes + 1 MiB), the weights' SHA-256 against the card, the target
    layer, and every tensor name and shape against the architecture. Then a forward of a small zero
    patch on ``device`` measures the layers' output bytes per input voxel
    (:attr:`LoadedModel.bytes_per_voxel`), the memory one patch of the card's size needs is
    checked (:class:`ResourceError`), and one forward of such a patch checks that it fits and gives
    one output per class name. ``device`` defaults to CUDA when available, else CPU. The module is
    in eval mode (on the CPU with channels-last weights, the fast layout there; results are the same).
    Any failure raises :class:`ModelError` naming the file.

    Example::

        >>> import LungGradCAMLib as lgc
        >>> loaded = lgc.load_model("default", device="cpu")
        >>> loaded.card.class_names, loaded.card.patch_size, loaded.card.spacing_mm
        (['background', 'nodule'], [24, 24, 24], [1.5, 1.5, 1.5])
    """
    weights = resolve_model_path(path_or_name)
    card = ModelCard.load(weights.with_suffix(".json"))
    if not card.sha256:
        raise ModelError(
            f"{weights}: the card has no 'sha256' of its weights; save models with save_model() so the card records it"
        )
    with torch.device("meta"):
        module = build_model(card.architecture, **card.kwargs)
    n_params = sum(p.numel() for p in module.parameters())
    n_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    limit = min(max_model_bytes(), available_memory() or max_model_bytes())
    if n_bytes > limit:
        raise ModelError(
            f"{weights}: the card declares a {card.architecture} with {n_params} parameters "
            f"({n_bytes / 1e9:.2f} GB), over the model size limit of {limit / 1e9:.2f} GB "
            "(LUNGGRADCAM_MAX_MODEL_BYTES, and the memory this process can get); refusing to allocate it"
        )
    if card.kwargs.get("in_channels", 1) != 1:
        raise ModelError(
            f"{weights}: the card's network takes {card.kwargs['in_channels']} input channels; "
            "LungGradCAM explains single-channel CT (in_channels 1)"
        )
    _check_declared_size(weights, 2 * n_bytes + (1 << 20))  # float64 weights and a pickle's bookkeeping
    digest = sha256_file(weights)
    if card.sha256.lower() != digest:
        raise ModelError(
            f"{weights}: SHA-256 {digest} does not match the card's {card.sha256}; "
            "the weights file is corrupt or belongs to another card"
        )
    try:
        for name in card.target_layer.split("+"):
            module.get_submodule(name)
    except AttributeError:
        raise ModelError(
            f"{weights}: target_layer {card.target_layer!r} is not a layer of {card.architecture}"
        ) from None
    state = _read_state_dict(weights)
    meta_state = module.state_dict()
    expected = {k: tuple(v.shape) for k, v in meta_state.items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        wrong = [f"{k}: {got[k]} != {expected[k]}" for k in sorted(set(got) & set(expected)) if got[k] != expected[k]][
            :5
        ]
        raise ModelError(
            f"{weights}: weights do not match {card.architecture}{card.kwargs}: "
            f"missing {missing}, unexpected {extra}, wrong shapes {wrong}"
        )
    device = resolve_device(device)
    # the loaded tensors replace the meta ones (assign): no second allocation, no initialisation,
    # and none of to_empty's meta kernels (which import sympy, 0.7 s at first use)
    module.load_state_dict({k: v.to(meta_state[k].dtype) for k, v in state.items()}, assign=True)
    if any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
        raise ModelError(f"{weights}: {card.architecture} holds tensors its weights file does not set")
    module = module.to(device).eval()
    if torch.device(device).type == "cpu":
        # oneDNN's 3D convolutions and pools run about twice as fast on channels-last weights
        module = module.to(memory_format=torch.channels_last_3d)
    # On the real device, not the meta one (meta kernels import torch._dynamo: 1-2 s at first use):
    # a small zero patch measures the layers' output bytes per input voxel; then one patch of the
    # card's size, when that fits into memory, shows that it fits the network, one logit per class
    full = card.patch_size or [32, 32, 32]
    small = [min(int(p), 16) for p in full]
    try:
        per_voxel = _probe(module, small, device)[1] / math.prod(small)
        check_bytes(
            per_voxel * math.prod(full),
            f"{weights}: one {full}-voxel patch through {card.architecture}",
            advice="use a model with smaller patches, or ",
        )
        logits_shape = _probe(module, full, device)[0]
    except (RuntimeError, ValueError, MemoryError) as exc:
        if is_out_of_memory(exc):
            raise out_of_memory(
                f"trying one {full}-voxel patch through {weights.name}'s {card.architecture}", exc
            ) from None
        raise ModelError(
            f"{weights}: {card.architecture} cannot take a {full} voxel input: {first_line(exc)}"
        ) from None
    per_voxel_shape = tuple(int(p) for p in full) if card.output == "mask" else ()
    if logits_shape != (1, len(card.class_names)) + per_voxel_shape:
        raise ModelError(
            f"{weights}: the network has {logits_shape[1]} outputs{' per voxel' * bool(per_voxel_shape)} "
            f"but the card names {len(card.class_names)} classes {card.class_names} "
            f"(outputs of shape {logits_shape} for one {full}-voxel input)"
        )
    return LoadedModel(module, card, per_voxel)


#: How many models :func:`cached_model` keeps (the least recently used is dropped).
MODEL_CACHE_SIZE = 4
_CACHE: "OrderedDict[Tuple[Any, ...], LoadedModel]" = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _file_key(path: Path) -> Tuple[Any, ...]:
    try:
        st = path.stat()
    except OSError:
        return (str(path), None)
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def cached_model(path_or_name: "Union[str, os.PathLike[str]]" = "default", device: Any = None) -> LoadedModel:
    """:func:`load_model`, once per weights file and device: keyed by the weights' and the card's
    resolved paths, sizes, modification times and inodes, so a model replaced at the same path
    is loaded anew. Keeps the :data:`MODEL_CACHE_SIZE` most recently used models."""
    weights = resolve_model_path(path_or_name).resolve()
    dev = resolve_device(device)
    key = (_file_key(weights), _file_key(weights.with_suffix(".json")), str(dev))
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    loaded = load_model(path_or_name, device=dev)
    with _CACHE_LOCK:
        _CACHE[key] = loaded
        while len(_CACHE) > MODEL_CACHE_SIZE:
            _CACHE.popitem(last=False)
    return loaded
