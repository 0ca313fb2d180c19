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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import ModelError
from ..preprocess import apply_card_preprocessing
from .card import ModelCard
from .networks import ARCHITECTURES

__all__ = ["ARCHITECTURES", "LoadedModel", "ModelCard", "available_models", "build_model",
           "load_model", "models_dir", "resolve_model_path", "save_model"]

#: Largest model ``load_model`` will build (parameters): 4 GB of float32.
MAX_PARAMETERS = 1_000_000_000
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the architecture registered as ``name`` (see ``ARCHITECTURES``) with ``kwargs``.

    Every network takes (N, C, K, J, I) inputs, returns (N, num_classes) logits, and has a
    ``cam_layer`` attribute naming its default Grad-CAM layer. Unknown names or keyword arguments
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
        raise ModelError(f"cannot build {name!r} with {kwargs}: {exc}") from None


def models_dir() -> Path:
    """Folder of bundled models: ``$LUNGGRADCAM_MODELS`` or ``<repo>/Resources/Models``."""
    env = os.environ.get("LUNGGRADCAM_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "Resources" / "Models"


def available_models() -> List[str]:
    """Names of the models in :func:`models_dir` (weights with a card beside them), sorted."""
    folder = models_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.iterdir()
                  if p.suffix in WEIGHT_SUFFIXES and p.with_suffix(".json").is_file())


def resolve_model_path(path_or_name: "Union[str, os.PathLike[str]]") -> Path:
    """The weights file for a model name (in :func:`models_dir`), a weights path, or a card path."""
    text = os.fspath(path_or_name)
    path = Path(text)
    if path.suffix == ".json":
        for suffix in WEIGHT_SUFFIXES:
            if path.with_suffix(suffix).is_file():
                return path.with_suffix(suffix)
        raise ModelError(f"{path}: no weights beside this card (expected {path.stem}.safetensors)")
    if path.suffix in WEIGHT_SUFFIXES:
        if not path.is_file():
            raise ModelError(f"{path}: model weights file not found")
        return path
    if os.sep in text or (os.altsep and os.altsep in text) or path.suffix:
        raise ModelError(f"{text}: not a model file; give a .safetensors/.pt/.pth file, its .json "
                         f"card, or a model name ({', '.join(available_models()) or 'none installed'})")
    for suffix in WEIGHT_SUFFIXES:
        candidate = models_dir() / f"{text}{suffix}"
        if candidate.is_file():
            return candidate
    raise ModelError(f"unknown model {text!r}; available in {models_dir()}: "
                     f"{', '.join(available_models()) or 'none'} (or give a path to a .safetensors file)")


@dataclass
class LoadedModel:
    """A network (eval mode, parameters on ``device``) with its validated card."""

    module: nn.Module
    card: ModelCard

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def target_layer(self) -> nn.Module:
        """The card's Grad-CAM layer."""
        return self.module.get_submodule(self.card.target_layer)

    def prepare(self, hu: torch.Tensor) -> torch.Tensor:
        """HU tensor (N, C, K, J, I) -> model input, windowed and normalised as the card says."""
        return apply_card_preprocessing(hu, self.card)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, classes) logits -> probabilities with the card's activation (softmax/sigmoid)."""
        return torch.softmax(logits, 1) if self.card.activation == "softmax" else torch.sigmoid(logits)


def sha256_file(path: "Union[str, os.PathLike[str]]") -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
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
        raise ModelError(f"{path}: refused to load: it is not a plain tensor state_dict "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
                         "Only weights saved with torch.save(model.state_dict()) or safetensors "
                         "are accepted; arbitrary pickled objects are never loaded.") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: expected a state_dict (name -> tensor), got {type(state).__name__}")
    return state


def load_model(path_or_name: "Union[str, os.PathLike[str]]" = "default",
               device: "Optional[Union[str, torch.device]]" = None) -> LoadedModel:
    """Load a model by name (``Resources/Models/<name>.safetensors`` + ``.json``) or path.

    Validates, in this order: the card (fields, known architecture, patch size limit), the
    weights' SHA-256 against the card, the parameter count (built on the meta device, limit 1e9,
    before anything is allocated), the target layer, every tensor name and shape against the
    architecture, and one forward of a zero patch on ``device`` (the patch fits, one output per
    class name). ``device`` defaults to CUDA when available, else CPU. The module is in eval mode
    (on the CPU with channels-last weights, the fast layout there; results are the same).
    Any failure raises :class:`ModelError` naming the file.
    """
    weights = resolve_model_path(path_or_name)
    card = ModelCard.load(weights.with_suffix(".json"))
    if not card.sha256:
        raise ModelError(f"{weights}: the card has no 'sha256' of its weights; save models with "
                         "save_model() so the card records it")
    digest = sha256_file(weights)
    if card.sha256.lower() != digest:
        raise ModelError(f"{weights}: SHA-256 {digest} does not match the card's {card.sha256}; "
                         "the weights file is corrupt or belongs to another card")
    with torch.device("meta"):
        module = build_model(card.architecture, **card.kwargs)
    n_params = sum(p.numel() for p in module.parameters())
    if n_params > MAX_PARAMETERS:
        raise ModelError(f"{weights}: the card declares a {card.architecture} with {n_params} "
                         f"parameters (limit {MAX_PARAMETERS}); refusing to allocate it")
    try:
        module.get_submodule(card.target_layer)
    except AttributeError:
        raise ModelError(f"{weights}: target_layer {card.target_layer!r} is not a layer of "
                         f"{card.architecture}") from None
    state = _read_state_dict(weights)
    meta_state = module.state_dict()
    expected = {k: tuple(v.shape) for k, v in meta_state.items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        wrong = [f"{k}: {got[k]} != {expected[k]}" for k in sorted(set(got) & set(expected))
                 if got[k] != expected[k]][:5]
        raise ModelError(f"{weights}: weights do not match {card.architecture}{card.kwargs}: "
                         f"missing {missing}, unexpected {extra}, wrong shapes {wrong}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # the loaded tensors replace the meta ones (assign): no second allocation, no initialisation,
    # and none of to_empty's meta kernels (which import sympy, 0.7 s at first use)
    module.load_state_dict({k: v.to(meta_state[k].dtype) for k, v in state.items()}, assign=True)
    if any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
        raise ModelError(f"{weights}: {card.architecture} holds tensors its weights file does not set")
    module = module.to(device).eval()
    if torch.device(device).type == "cpu":
        # oneDNN's 3D convolutions and pools run about twice as fast on channels-last weights
        module = module.to(memory_format=torch.channels_last_3d)
    # one forward of one zero patch: the patch fits the network and it gives one logit per class.
    # On the real device, not the meta one: meta kernels import torch._dynamo (1-2 s at first use)
    probe = card.patch_size or [32, 32, 32]
    try:
        with torch.inference_mode():
            logits = module(torch.zeros(1, int(card.kwargs.get("in_channels", 1)), *probe, device=device))
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"{weights}: {card.architecture} cannot take a {probe} voxel input: "
                         f"{str(exc).splitlines()[0]}") from None
    if tuple(logits.shape) != (1, len(card.class_names)):
        raise ModelError(f"{weights}: the network has {logits.shape[-1]} outputs but the card names "
                         f"{len(card.class_names)} classes {card.class_names}")
    return LoadedModel(module, card)
