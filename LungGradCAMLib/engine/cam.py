"""Class activation maps of 3D CNNs: Grad-CAM and its family, computed on the model's device.

Inputs are 5-D tensors (N, C, D, H, W) = (batch, channel, K, J, I); maps are (N, D, H, W),
float32, high = important (unlike MONAI's default, nothing is inverted).

Every method follows the same steps, owned by :class:`CAM`:

1. one forward pass in eval mode with the parameters frozen; a forward hook on the target layer
   returns ``A.detach().requires_grad_()`` (a clone of it goes downstream, so that an in-place
   op after the layer, e.g. ``ReLU(inplace=True)``, cannot overwrite ``A``), which cuts the
   autograd graph at the layer: ``torch.autograd.grad`` of the target score w.r.t. ``A`` then
   costs about as much as the part of the forward pass after the layer;
2. the method's map at feature resolution (subclasses say how: see each class), then a ReLU;
3. upsampling to the input size with ``F.interpolate(mode="trilinear", align_corners=False)``;
4. per-sample min-max normalisation to [0, 1] (``normalize=False`` keeps the raw values).

Targets: ``None`` (each sample's predicted class), an int (negative counts from the end), one
class per sample (list, array or tensor), or a callable ``f(output) -> (N,)`` score for other
heads. ``activation="softmax"`` (default): class c scores logit c, probabilities are the
softmax, and a model with ONE output logit is binary (class 1 scores the logit, class 0 minus the
logit, p(1) = sigmoid). ``activation="sigmoid"``: one-vs-rest, class c scores logit c and its
probability is sigmoid(logit c), whatever the number of logits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import CamError
from .methods import DEFAULT_METHOD, METHODS, TABLE, canonical

__all__ = [
    "CAM",
    "CamResult",
    "GradCAM",
    "GradCAMPlusPlus",
    "XGradCAM",
    "HiResCAM",
    "LayerCAM",
    "ScoreCAM",
    "GuidedBackprop",
    "GuidedGradCAM",
    "METHODS",
    "compute_cam",
    "default_layer",
    "minmax_per_sample",
]

Target = Union[None, int, List[int], torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]
Layer = Union[None, str, nn.Module]
Layers = Union[Layer, Sequence[Union[str, nn.Module]]]

_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
_EPS = 1e-7


def probabilities(logits: torch.Tensor, activation: str = "softmax") -> torch.Tensor:
    """(N, K) logits -> (N, K) probabilities, the package's one rule: the softmax, or with
    ``activation="sigmoid"`` each logit's sigmoid (one-vs-rest); a single-logit softmax-mode model is
    binary, (N, 2): [1 - p, p], p = sigmoid(logit)."""
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


@dataclass
class CamResult:
    """What one :class:`CAM` call returns: the maps and the scores of the same forward pass.

    ``cam``: (N, D, H, W) float32 maps (in [0, 1] when normalised). ``logits``: the model output
    (N, K), float32, detached. ``classes``: (N,) int64 explained class per sample, or ``None``
    for a callable target. ``scores``: (N,) the differentiated target score (logit, or minus the
    logit for class 0 of a binary single-logit model, or the callable's value). ``activation``:
    how logits become probabilities (see the module doc).
    """

    cam: torch.Tensor
    logits: torch.Tensor
    classes: Optional[torch.Tensor]
    scores: torch.Tensor
    activation: str = "softmax"

    @property
    def probabilities(self) -> torch.Tensor:
        """:func:`probabilities` of the logits."""
        return probabilities(self.logits, self.activation)

    @property
    def target_probability(self) -> Optional[torch.Tensor]:
        """(N,) probability of each sample's explained class; ``None`` for a callable target."""
        if self.classes is None:
            return None
        return self.probabilities.gather(1, self.classes[:, None])[:, 0]


def minmax_per_sample(t: torch.Tensor) -> torch.Tensor:
    """Scale each sample (dim 0) of ``t`` linearly to [0, 1]; a constant sample becomes 0."""
    flat = t.flatten(1)
    shape = (-1,) + (1,) * (t.dim() - 1)
    lo = flat.amin(1).view(shape)
    span = (flat.amax(1).view(shape) - lo).clamp_min(torch.finfo(t.dtype).tiny)
    return (t - lo) / span


def default_layer(model: nn.Module) -> str:
    """Dotted name of the default CAM layer: the last ``Conv3d`` in registration order, or the
    activation that follows it (directly or after one normalisation module, e.g. BatchNorm)."""
    names = list(model.named_modules())
    convs = [n for n, (_, m) in enumerate(names) if isinstance(m, nn.Conv3d)]
    if not convs:
        raise CamError(
            f"{type(model).__name__} has no Conv3d layer; pass layer= (a module or "
            f"its dotted name) to choose the CAM layer"
        )
    last = convs[-1]
    for name, module in names[last + 1 : last + 3]:
        if isinstance(module, _ACTIVATIONS):
            return name
        if not isinstance(module, _NORMS):
            break
    return names[last][0]


def resolve_layer(model: nn.Module, layer: Layer) -> Tuple[str, nn.Module]:
    if layer is None:
        layer = default_layer(model)
    modules = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        for name, module in modules.items():
            if module is layer:
                return name, module
        raise CamError(
            f"the layer module {type(layer).__name__} is not part of the model; pass a "
            f"module of the model or its dotted name"
        )
    if isinstance(layer, str) and layer in modules:
        return layer, modules[layer]
    convs = [n for n, m in modules.items() if isinstance(m, (nn.Conv3d,) + _ACTIVATIONS)]
    raise CamError(
        f"layer {layer!r} is not a module of {type(model).__name__}; use a dotted "
        f"name such as {', '.join(repr(c) for c in convs[-4:]) or 'features.conv1'}"
    )


def resolve_layers(model: nn.Module, layer: Layers) -> List[Tuple[str, nn.Module]]:
    """One or more (name, module) pairs: ``layer`` is None, a module, a dotted name, several names
    joined by ``+`` (``"features.act4+features.act6"``), or a list of names/modules."""
    if isinstance(layer, str) and "+" in layer:
        layer = [part.strip() for part in layer.split("+")]
    if isinstance(layer, (list, tuple)):
        if not layer:
            raise CamError("an empty list of CAM layers; give at least one")
        found = [resolve_layer(model, one) for one in layer]
        if len({name for name, _ in found}) != len(found):
            raise CamError(f"CAM layers {[n for n, _ in found]} name one layer twice")
        return found
    return [resolve_layer(model, layer)]


def _canonical(method: str) -> str:
    try:
        return canonical(method)
    except KeyError as exc:
        raise CamError(exc.args[0]) from None


@contextlib.contextmanager
def _inference_state(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration; every module's mode and every
    parameter's ``requires_grad`` are restored afterwards, also on errors."""
    modes = [(m, m.training) for m in model.modules()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        model.eval()
        for p in trainable:
            p.requires_grad_(False)
        # the caller may be in no_grad/inference mode; the CAM needs autograd from the layer on
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for m, training in modes:
            m.training = training


class CAM:
    """A reusable class-activation-map explainer for one model and layer (a context manager).

    ``CAM(model, layer=None, method="gradcam")`` returns the subclass for ``method`` (one of
    :data:`METHODS`). Entering installs the forward hook, leaving removes it (also on errors);
    calling it outside a ``with`` block installs and removes the hook around that call.

    ``cam_obj(x, target=None) -> CamResult``: the maps and the model output of ONE forward pass.

    ``layer``: None (see :func:`default_layer`), a dotted module name, a module, or several
    layers (a list, or names joined by ``+``: ``"features.act4+features.act6"``), whose maps the
    gradient methods fuse (see :meth:`_fused`). Each layer's output must be a 5-D tensor produced
    once per forward pass. ``upsample``: trilinear
    (``align_corners=False``) to the input size; ``normalize``: per-sample min-max to [0, 1].
    ``amp``: ``True`` (bfloat16, or float16 where bfloat16 is unsupported) or a dtype runs the
    model under ``torch.autocast`` on CUDA; ignored on other devices. ``score_batch_size``:
    masked inputs per forward pass for Score-CAM (bounds its memory). ``activation``:
    ``"softmax"`` or ``"sigmoid"``, how the model's logits map to classes (see the module doc).
    """

    #: method name this class implements (the key in :data:`METHODS`)
    name = ""
    #: whether the method needs dScore/dA at the layer (from :data:`~.methods.TABLE`)
    uses_gradients = True
    #: Score-CAM's masked inputs per forward pass, unless ``score_batch_size`` says otherwise
    SCORE_BATCH_SIZE = 32
    _registry: Dict[str, type] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:  # each method is one row of engine.methods.TABLE, which says what it needs
            if cls.name not in TABLE:
                raise CamError(
                    f"{cls.__name__} computes {cls.name!r}, which LungGradCAMLib.engine.methods.TABLE does not list"
                )
            cls.uses_gradients = TABLE[cls.name].gradients
            CAM._registry[cls.name] = cls

    # model defaults to None only so that copy/pickle (which call __new__ without arguments)
    # work: a deep copy of a model carries the hooks of the CAMs installed on it
    def __new__(
        cls, model: Optional[nn.Module] = None, layer: Layer = None, method: Optional[str] = None, **kwargs: Any
    ) -> "CAM":
        if cls is CAM:
            cls = CAM._registry[_canonical(method or DEFAULT_METHOD)]
        elif method is not None and _canonical(method) != cls.name:
            raise CamError(f"{cls.__name__} computes {cls.name!r}, not {method!r}; use CAM(model, method={method!r})")
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        layer: Layer = None,
        method: Optional[str] = None,
        *,
        upsample: bool = True,
        normalize: bool = True,
        amp: Union[None, bool, torch.dtype] = None,
        score_batch_size: int = SCORE_BATCH_SIZE,
        activation: str = "softmax",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise CamError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if activation not in ("softmax", "sigmoid"):
            raise CamError(f"activation must be 'softmax' or 'sigmoid', not {activation!r}")
        if int(score_batch_size) < 1:
            raise CamError(f"score_batch_size must be >= 1, got {score_batch_size}")
        self.model = model
        self.layers = resolve_layers(model, layer)
        if len(self.layers) > 1 and type(self)._map is not CAM._map:
            raise CamError(
                f"{self.name} takes one layer; several layers ({'+'.join(n for n, _ in self.layers)}) "
                "are fused only by the gradient methods (gradcam, gradcam++, xgradcam, hirescam, layercam)"
            )
        self.layer_name = "+".join(name for name, _ in self.layers)
        self.layer = self.layers[0][1]
        self.upsample = bool(upsample)
        self.normalize = bool(normalize)
        self.amp = amp
        self.score_batch_size = int(score_batch_size)
        self.activation = activation
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._capture = False
        self._acts: List[torch.Tensor] = []

    # -- hook lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> "CAM":
        if not self._handles:
            self._handles = [module.register_forward_hook(self._hook) for _, module in self.layers]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> Optional[torch.Tensor]:
        if not self._capture:
            return None
        name = next(n for n, m in self.layers if m is module)
        if not isinstance(output, torch.Tensor) or output.dim() != 5:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise CamError(
                f"layer {name!r} outputs {shape}; a 3D CAM needs a 5-D "
                f"(N, C, D, H, W) feature map: choose a convolutional layer"
            )
        if self._acts:  # a later layer of several: stays in the graph that starts at the first
            self._acts.append(output)
            return output.clone()
        a = output.detach()
        if self.uses_gradients:
            a.requires_grad_(True)
        self._acts.append(a)
        return a.clone()

    # -- one call --------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, target: Target = None) -> CamResult:
        """Maps (N, D, H, W) and scores of ``x`` (N, C, D, H, W) for ``target`` (see module doc)."""
        if not self._handles:
            with self:
                return self(x, target)
        x = self._input(x)
        with _inference_state(self.model):
            self._acts = []
            self._capture = True
            try:
                with self._autocast(x.device):
                    out = self.model(x)
            finally:
                self._capture = False
            acts, self._acts = self._acts, []
            if not isinstance(out, torch.Tensor):
                raise CamError(
                    f"the model returned {type(out).__name__}; a CAM needs a tensor "
                    f"output (wrap the model to return its logits)"
                )
            if len(acts) != len(self.layers):
                raise CamError(
                    f"layer(s) {self.layer_name!r} ran {len(acts)} times in one forward "
                    f"pass; choose layers that run exactly once each"
                )
            classes = self._classes(out, target)
            score = self._score(out, classes, target)
            if len(acts) == 1:
                cam = self._resize(x, F.relu(self._map(x, acts[0], score, classes, target).float()))
            else:
                cam = self._fused(x, acts, score)
            if self.normalize:
                cam = minmax_per_sample(cam)
        return CamResult(cam.detach(), out.detach().float(), classes, score.detach().float(), self.activation)

    def _resize(self, x: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
        """``cam`` (N, d, h, w) trilinearly upsampled to ``x``'s size when ``upsample``."""
        if self.upsample and cam.shape[1:] != x.shape[2:]:
            cam = F.interpolate(cam[:, None], size=x.shape[2:], mode="trilinear", align_corners=False)[:, 0]
        return cam

    def _fused(self, x: torch.Tensor, acts: List[torch.Tensor], score: torch.Tensor) -> torch.Tensor:
        """Several layers: each layer's map (this method's weighting, ReLU), upsampled to the input
        and min-max scaled per sample, then their geometric mean, so a voxel is hot only where
        every layer agrees (the coarse layers say what, the fine ones where). One backward pass
        from the score to the first layer gives every layer's gradient."""
        grads = torch.autograd.grad(score.sum(), acts, allow_unused=True)
        if any(g is None for g in grads):
            raise CamError(f"the target score does not depend on every layer of {self.layer_name!r}")
        if not self.upsample:
            raise CamError("several CAM layers have different sizes: they are fused at the input size (upsample=True)")
        fused = None
        for a, g in zip(acts, grads):
            cam = minmax_per_sample(self._resize(x, F.relu(self._weigh(_wide(a.detach()), _wide(g)).float())))
            fused = cam if fused is None else fused * cam
        return fused ** (1.0 / len(acts))

    def _input(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise CamError(f"x must be a torch.Tensor (N, C, D, H, W), not {type(x).__name__}")
        if x.dim() != 5:
            raise CamError(f"x must be 5-D (N, C, D, H, W); got shape {tuple(x.shape)}")
        param = next(self.model.parameters(), None)
        if param is not None:
            x = x.to(param.device, non_blocking=True)
        return x if x.is_floating_point() else x.float()

    def _autocast(self, device: torch.device) -> Any:
        if not self.amp or device.type != "cuda":
            return contextlib.nullcontext()
        dtype = (
            self.amp
            if isinstance(self.amp, torch.dtype)
            else (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        )
        return torch.autocast("cuda", dtype=dtype)

    def _gradient(self, score: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        (grad,) = torch.autograd.grad(score.sum(), a, allow_unused=True)
        if grad is None:
            raise CamError(
                f"the target score does not depend on layer {self.layer_name!r}: "
                f"choose a layer on the path to the output"
            )
        return _wide(grad)

    def _map(
        self, x: torch.Tensor, a: torch.Tensor, score: torch.Tensor, classes: Optional[torch.Tensor], target: Target
    ) -> torch.Tensor:
        """The map before the final ReLU: (N, d, h, w) at feature or (N, D, H, W) at input
        resolution. Gradient methods only override :meth:`_weigh`."""
        return self._weigh(_wide(a.detach()), self._gradient(score, a))

    def _weigh(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _binary(self, out: torch.Tensor) -> bool:
        """One logit in softmax mode: two classes, class 0 scored by minus the logit."""
        return self.activation == "softmax" and out.shape[1] == 1

    def _classes(self, out: torch.Tensor, target: Target) -> Optional[torch.Tensor]:
        """(N,) int64 class per sample on ``out``'s device, or None for a callable target."""
        if callable(target):
            return None
        if out.dim() != 2:
            raise CamError(
                f"the model output has shape {tuple(out.shape)}, not (N, classes); "
                f"pass target= a callable that returns one score per sample"
            )
        return _class_indices(target, out, 2 if self._binary(out) else out.shape[1])

    def _score(self, out: torch.Tensor, classes: Optional[torch.Tensor], target: Target) -> torch.Tensor:
        """(N,) the score whose gradient the CAM uses."""
        if classes is None:
            score = target(out)
            n = out.shape[0]
            if not isinstance(score, torch.Tensor) or score.numel() != n:
                raise CamError(
                    f"the target callable must return one score per sample ({n}); got "
                    f"{tuple(score.shape) if isinstance(score, torch.Tensor) else score!r}"
                )
            return score.reshape(n)
        if self._binary(out):
            return torch.where(classes == 1, out[:, 0], -out[:, 0])
        return out.gather(1, classes[:, None])[:, 0]


def _class_indices(target: Target, out: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``target`` (None, int or one per sample; negative counts from the end) as (N,) int64."""
    n = out.shape[0]
    if target is None:
        binary = n_classes > out.shape[1]  # one logit standing for two classes
        return (out[:, 0] > 0).long() if binary else out.argmax(1)
    if isinstance(target, bool):
        raise CamError(f"target must be a class index, not {target!r}")
    try:
        classes = torch.as_tensor(target, device=out.device)
    except (TypeError, ValueError, RuntimeError):
        raise CamError(
            f"target must be None, a class index, one index per sample or a callable; got {type(target).__name__}"
        ) from None
    if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise CamError(f"target must hold integer class indices, got dtype {classes.dtype}")
    classes = classes.long().reshape(-1)
    if classes.numel() == 1:
        classes = classes.expand(n)
    if classes.numel() != n:
        raise CamError(f"target has {classes.numel()} classes for a batch of {n}; give one per sample or a single int")
    if bool(((classes < -n_classes) | (classes >= n_classes)).any()):
        raise CamError(
            f"target {classes.tolist()} out of range for a model with {n_classes} "
            f"classes (valid: {-n_classes}..{n_classes - 1})"
        )
    return classes % n_classes


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Half-precision (autocast) maps and gradients are weighed in float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _spatial(t: torch.Tensor, op: str) -> torch.Tensor:
    """Sum or mean over the three spatial axes, kept as singleton dims."""
    return getattr(t, op)(dim=(2, 3, 4), keepdim=True)


def _grad_cam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (_spatial(g, "mean") * a).sum(1)


class GradCAM(CAM):
    """Grad-CAM (Selvaraju et al. 2017): ``w_c = mean_xyz dS/dA_c``, map = ReLU(sum_c w_c A_c)."""

    name = "gradcam"

    def _weigh(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return _grad_cam(a, g)


class GradCAMPlusPlus(CAM):
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19 with the exponential score, so the higher
    derivatives are powers of ``g = dS/dA``):
    ``alpha = g^2 / (2 g^2 + (sum_xyz A_c) g^3)``, ``w_c = sum_xyz alpha ReLU(g)``,
    map = ReLU(sum_c w_c A_c). ``alpha`` is computed as ``1 / (2 + (sum_xyz A_c) g)`` (0 where
    g = 0): no epsilon, which would dominate ``g^2`` for the small gradients of real networks."""

    name = "gradcam++"

    def _weigh(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        denom = 2 + _spatial(a, "sum") * g
        alpha = torch.where((g != 0) & (denom != 0), 1 / denom, torch.zeros_like(denom))
        return (_spatial(alpha * F.relu(g), "sum") * a).sum(1)


class XGradCAM(CAM):
    """XGrad-CAM (Fu et al. 2020): ``w_c = sum_xyz (A_c dS/dA_c) / sum_xyz A_c``,
    map = ReLU(sum_c w_c A_c)."""

    name = "xgradcam"

    def _weigh(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (_spatial(g * a, "sum") / (_spatial(a, "sum") + _EPS) * a).sum(1)


class HiResCAM(CAM):
    """HiResCAM (Draelos & Carin 2020): element-wise, no pooling: map = ReLU(sum_c dS/dA_c * A_c)."""

    name = "hirescam"

    def _weigh(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (g * a).sum(1)


class LayerCAM(CAM):
    """LayerCAM (Jiang et al. 2021): map = ReLU(sum_c ReLU(dS/dA_c) * A_c)."""

    name = "layercam"

    def _weigh(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (F.relu(g) * a).sum(1)


class ScoreCAM(CAM):
    """Score-CAM (Wang et al. 2020), gradient free: each channel ``A_c`` is upsampled to the
    input (trilinear), min-max scaled to a [0, 1] mask ``M_c``, the model scores ``x * M_c``;
    ``w = softmax_c(score)``, map = ReLU(sum_c w_c A_c).

    Costs one masked forward pass per sample and channel: a batch's masked inputs (all its
    samples and channels together) go through the model ``score_batch_size`` at a time, which
    bounds the memory. A channel that is constant over a sample (a ReLU channel that never fired)
    gives the all-zero mask, so ``x * M_c`` is the all-zero input for every such channel: the
    model scores it once per call instead of once per channel."""

    name = "scorecam"

    def _map(
        self, x: torch.Tensor, a: torch.Tensor, score: torch.Tensor, classes: Optional[torch.Tensor], target: Target
    ) -> torch.Tensor:
        a = _wide(a)
        n, c = a.shape[:2]
        flat = a.flatten(2)
        constant = flat.amax(2) == flat.amin(2)  # (n, c): minmax_per_sample makes these masks 0
        weights = torch.empty(n, c, device=a.device, dtype=a.dtype)
        with torch.no_grad():
            if bool(constant.any()):
                with self._autocast(x.device):
                    out = self.model(torch.zeros_like(x[:1]))
                zero_score = self._score(out.expand(n, -1), classes, target).to(a.dtype)
                weights[constant] = zero_score[:, None].expand(n, c)[constant]
            pairs = (~constant).nonzero()
            for start in range(0, len(pairs), self.score_batch_size):
                s, ch = pairs[start : start + self.score_batch_size].unbind(1)
                masks = F.interpolate(a[s, ch][:, None], size=x.shape[2:], mode="trilinear", align_corners=False)
                with self._autocast(x.device):
                    out = self.model(x[s] * minmax_per_sample(masks).to(x.dtype))
                weights[s, ch] = self._score(out, None if classes is None else classes[s], target).to(a.dtype)
        w = torch.softmax(weights, dim=1)
        return (w[:, :, None, None, None] * a).sum(1)


class _GuidedReLUGradient(torch.autograd.Function):
    """Identity forward; backward keeps only positive gradients. Placed right after a ReLU (whose
    own backward keeps positive inputs), the pair backpropagates as guided backpropagation."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:
        return y.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp_min(0)


def _guided_hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return _GuidedReLUGradient.apply(output)


class GuidedBackprop(CAM):
    """Guided backpropagation (Springenberg et al. 2015): dS/dx with every ``nn.ReLU`` passing
    back only positive gradients at positive inputs; map = ReLU(sum over input channels), at
    input resolution (positive evidence, like Grad-CAM's ReLU). Needs a second forward pass and a
    full backward to the input; ReLUs applied functionally (``F.relu``) are not guided."""

    name = "guided-backprop"

    def _map(
        self, x: torch.Tensor, a: torch.Tensor, score: torch.Tensor, classes: Optional[torch.Tensor], target: Target
    ) -> torch.Tensor:
        return self._guided(x, classes, target)

    def _guided(self, x: torch.Tensor, classes: Optional[torch.Tensor], target: Target) -> torch.Tensor:
        relus = [m for m in self.model.modules() if isinstance(m, nn.ReLU)]
        if not relus:
            raise CamError(
                f"{type(self.model).__name__} has no nn.ReLU modules, so guided "
                f"backpropagation would equal the plain gradient; use another method"
            )
        handles = [m.register_forward_hook(_guided_hook) for m in relus]
        try:
            xg = x.detach().clone().requires_grad_(True)
            with self._autocast(x.device):
                out = self.model(xg)
            (grad,) = torch.autograd.grad(self._score(out, classes, target).sum(), xg)
        finally:
            for h in handles:
                h.remove()
        return F.relu(_wide(grad).sum(1))


class GuidedGradCAM(GuidedBackprop):
    """Guided Grad-CAM (Selvaraju et al. 2017): the guided-backpropagation map times the Grad-CAM
    map upsampled (trilinear) to the input, at input resolution."""

    name = "guided-gradcam"

    def _map(
        self, x: torch.Tensor, a: torch.Tensor, score: torch.Tensor, classes: Optional[torch.Tensor], target: Target
    ) -> torch.Tensor:
        grad_cam = F.relu(_grad_cam(_wide(a.detach()), self._gradient(score, a)))
        grad_cam = F.interpolate(grad_cam[:, None], size=x.shape[2:], mode="trilinear", align_corners=False)[:, 0]
        return self._guided(x, classes, target) * grad_cam


# every method of the table has its class (METHODS, imported from .methods, lists them)
if set(CAM._registry) != set(METHODS):
    raise CamError(f"engine.methods.TABLE lists {sorted(set(METHODS) - set(CAM._registry))} without a CAM class")


def compute_cam(
    model: nn.Module,
    x: torch.Tensor,
    method: str = DEFAULT_METHOD,
    target: Target = None,
    layer: Layer = None,
    upsample: bool = True,
    normalize: bool = True,
    amp: Union[None, bool, torch.dtype] = None,
    activation: str = "softmax",
) -> torch.Tensor:
    """CAM maps (N, D, H, W) float32 of ``model`` for ``x`` (N, C, D, H, W), on the model's device.

    One-shot form of :class:`CAM` (see there and the module doc for ``target``, ``layer``,
    ``upsample``, ``normalize``, ``amp`` and ``activation``). Use :class:`CAM` to also get the class scores of the
    same forward pass or to explain many inputs with one hook installation.
    """
    with CAM(model, layer, method, upsample=upsample, normalize=normalize, amp=amp, activation=activation) as cam:
        return cam(x, target).cam
