"""The 3D CNN architectures. Inputs are (N, C, K, J, I) tensors (K = slice axis); outputs are
(N, num_classes) logits, or for the segmentation network (:class:`UNet3D`, ``output = "mask"``)
(N, num_classes, K, J, I) logits per voxel. Each class names its default Grad-CAM target layer in
``cam_layer`` (a dotted module name for ``module.get_submodule``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def _pool() -> nn.MaxPool3d:
    """2x max pooling that rounds odd sizes up, so edge voxels are never dropped."""
    return nn.MaxPool3d(2, ceil_mode=True)


class GradCAM3DCNN(nn.Module):
    """The 3D Grad-CAM CNN of the method this project builds on (8 layers, 32-64-128-128-256-512
    filters at ``width=32``).

    Reading of the paper we chose (its text leaves these open):

    * every 3x3x3 convolution uses padding 1 ("same"), so any input size works (patches or whole
      volumes such as 64x512x512); only the pools shrink the grid (by 16 overall);
    * the pools round up (``ceil_mode``): on sizes that are not multiples of 16 (e.g. 24-voxel
      patches: 24 -> 12 -> 6 -> 3 -> 2) no voxel row is dropped, so a nodule anywhere in the patch
      reaches the classifier (flooring would ignore the last third of a 24-voxel patch);
    * each block is Conv -> ReLU -> MaxPool(2) -> BatchNorm, the order of the Keras 3D-CT example
      the paper follows;
    * the head is global average pooling -> dropout -> one linear layer (no hidden dense layer);
    * ``width`` scales all six filter counts (32 = the paper); the bundled default model uses a
      compact width (see its card);
    * ``cam_pools`` is the number of 2x pools before the CAM layer: 3 (the paper's; ``pool1``,
      ``pool2`` and ``pool4``) or 2 (no ``pool4``: the 1x1 convolutions 5 and 6 run at the
      resolution of convolution 4, so the CAM's cells are half as wide, 6 mm on 24^3 patches of
      1.5 mm instead of 12 mm, for about 10 % more computation).

    The CAM target is ``features.act6``: the ReLU output of the last convolution, at 1/8 of the
    input resolution (1/4 with ``cam_pools=2``), before the last pool.

    ``head="attention"`` (a region model's member) replaces the global average by an
    attention-weighted one at ``act2``'s grid (1/2 of the input): a map ``att`` in [0, 1] from
    ``act2`` and ``act6``, the deep features brought to that grid and projected to
    ``evidence_channels`` (ReLU), and their product, the ``evidence`` layer (the CAM layer:
    LayerCAM there is ``att`` times the features' positive evidence), averaged with weights
    ``att``; the head also sees log(1 + sum of ``att``), the size the attention covers, and has no
    ``pool6``/``bn6``. Trained with :meth:`auxiliary_loss` (the readers' outline as the target of
    ``att``) the map looks at the nodule. Either head can be run in two steps
    (:meth:`evidence_map`, then :meth:`decide`), as :class:`RegionNet` does to average members.
    """

    cam_layer = "features.act6"
    HEADS = ("gap", "attention")

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        width: int = 32,
        dropout: float = 0.3,
        cam_pools: int = 3,
        head: str = "gap",
        evidence_channels: int = 16,
    ) -> None:
        super().__init__()
        if cam_pools not in (2, 3):
            raise ValueError(f"cam_pools must be 2 or 3, got {cam_pools!r}")
        if head not in self.HEADS:
            raise ValueError(f"head must be one of {self.HEADS}, got {head!r}")
        w = int(width)
        c1, c2, c3, c4, c5, c6 = w, 2 * w, 4 * w, 4 * w, 8 * w, 16 * w
        layers = [
            ("conv1", nn.Conv3d(in_channels, c1, 3, padding=1)),
            ("act1", nn.ReLU()),
            ("pool1", _pool()),
            ("bn1", nn.BatchNorm3d(c1)),
            ("conv2", nn.Conv3d(c1, c2, 3, padding=1)),
            ("act2", nn.ReLU()),
            ("pool2", _pool()),
            ("bn2", nn.BatchNorm3d(c2)),
            ("conv3", nn.Conv3d(c2, c3, 3, padding=1)),
            ("act3", nn.ReLU()),
            ("conv4", nn.Conv3d(c3, c4, 3, padding=1)),
            ("act4", nn.ReLU()),
            *([("pool4", _pool())] if cam_pools == 3 else []),
            ("bn4", nn.BatchNorm3d(c4)),
            ("conv5", nn.Conv3d(c4, c5, 1)),
            ("act5", nn.ReLU()),
            ("conv6", nn.Conv3d(c5, c6, 1)),
            ("act6", nn.ReLU()),
        ]
        self.head_kind = head
        # input voxels per voxel of evidence_map's output: act2's grid (after pool1), or act6's
        self.evidence_reduction = 2 if head == "attention" else 2**cam_pools
        if head == "gap":
            layers += [("pool6", _pool()), ("bn6", nn.BatchNorm3d(c6))]
        self.features = nn.Sequential()
        for name, layer in layers:
            self.features.add_module(name, layer)
        if head == "gap":
            self.head = nn.Sequential(
                nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c6, num_classes)
            )
            self._split = len(layers) - 2  # evidence_map ends with act6
        else:
            d = int(evidence_channels)
            self.attend_fine, self.attend_deep = nn.Conv3d(c2, 1, 1), nn.Conv3d(c6, 1, 1)
            self.value = nn.Conv3d(c6, d, 1)
            self.evidence = nn.Identity()
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d + 1, num_classes))
            self.attention_logits: Optional[torch.Tensor] = None  # of the last forward, for auxiliary_loss

    def evidence_map(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The CAM layer's input: ``act6`` (gap head), or the evidence (attention head) and the
        attention map ``att`` (N, 1, ...) at ``act2``'s grid."""
        if self.head_kind == "gap":
            return self.features[: self._split](x), None
        fine = None
        for name, layer in self.features.named_children():
            x = layer(x)
            if name == "act2":
                fine = x
        size = fine.shape[2:]
        logits = self.attend_fine(fine) + F.interpolate(
            self.attend_deep(x), size=size, mode="trilinear", align_corners=False
        )
        self.attention_logits = logits
        att = torch.sigmoid(logits)
        # projecting before upsampling is the same (both are linear per voxel) and 8x cheaper
        value = F.relu(F.interpolate(self.value(x), size=size, mode="trilinear", align_corners=False))
        return att * value, att

    def decide(self, evidence: torch.Tensor, att: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits from :meth:`evidence_map`'s outputs."""
        if att is None:
            return self.head(self.features[self._split :](evidence))
        mass = att.sum(dim=(2, 3, 4))
        pooled = evidence.sum(dim=(2, 3, 4)) / mass.clamp_min(1e-3)
        return self.head(torch.cat([pooled, torch.log1p(mass)], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_kind == "gap":
            return self.head(self.features(x))
        evidence, att = self.evidence_map(x)
        return self.decide(self.evidence(evidence), att)

    def auxiliary_loss(self, target: torch.Tensor) -> torch.Tensor:
        """The attention head's loss against ``target`` (N, 1, K, J, I) in [0, 1] on the input's
        grid (e.g. the readers' outline): binary cross-entropy plus soft Dice of the last forward's
        attention map against the target averaged onto its grid."""
        logits = self.attention_logits
        if logits is None:
            raise RuntimeError("auxiliary_loss needs the attention head and a forward pass first")
        return attention_loss(logits, target)


def attention_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice of attention ``logits`` (N, 1, k, j, i) against ``target`` (N, 1, K, J, I)
    in [0, 1], averaged onto the logits' grid (adaptive average pooling)."""
    soft = F.adaptive_avg_pool3d(target.float(), logits.shape[2:])
    bce = F.binary_cross_entropy_with_logits(logits.float(), soft)
    p = torch.sigmoid(logits.float())
    dice = 1 - (2 * (p * soft).sum(dim=(1, 2, 3, 4)) + 1) / (p.sum(dim=(1, 2, 3, 4)) + soft.sum(dim=(1, 2, 3, 4)) + 1)
    return bce + dice.mean()


class Small3DCNN(nn.Module):
    """A small 3D CNN: three Conv3D (3x3x3) + ReLU + MaxPool3D(2) blocks, then three fully
    connected layers with dropout. The paper trains it with binary cross-entropy (use a card with
    ``activation="sigmoid"``).

    The fully connected part needs a fixed-size input: an adaptive average pool to ``pooled``
    (K, J, I) cells sits before it, so the network accepts any input size. Pools round up, as
    in :class:`GradCAM3DCNN`.
    The CAM target is ``features.act3`` (last conv, 1/4 of the input resolution).
    """

    cam_layer = "features.act3"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (16, 32, 64),
        hidden: Sequence[int] = (128, 64),
        pooled: Sequence[int] = (2, 2, 2),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if len(channels) != 3 or len(hidden) != 2 or len(pooled) != 3:
            raise ValueError("small3d_cnn needs 3 channels, 2 hidden sizes and a 3-value pooled size")
        c = [in_channels] + [int(v) for v in channels]
        self.features = nn.Sequential()
        for n in range(3):
            self.features.add_module(f"conv{n + 1}", nn.Conv3d(c[n], c[n + 1], 3, padding=1))
            self.features.add_module(f"act{n + 1}", nn.ReLU())
            # the last pool sits after the CAM layer so the CAM keeps 1/4 resolution
            self.features.add_module(f"pool{n + 1}", _pool())
        cells = int(pooled[0]) * int(pooled[1]) * int(pooled[2])
        h1, h2 = (int(v) for v in hidden)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool3d(tuple(int(p) for p in pooled)),
            nn.Flatten(),
            nn.Linear(c[3] * cells, h1),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(h1, h2),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(h2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _BasicBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18_3D(nn.Module):
    """3D ResNet-18 (basic blocks, [2, 2, 2, 2] layers, widths ``base_width`` x 1, 2, 4, 8).

    ``stem_stride`` and ``stem_pool`` control the stem (7x7x7 conv, stride 2 + max pool in the
    original, for whole volumes); for 32-64 voxel nodule patches use ``stem_stride=1,
    stem_pool=False`` so the CAM layer (``layer4``, 1/8 of the input then) is not a single voxel.
    """

    cam_layer = "layer4"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        base_width: int = 64,
        stem_stride: int = 2,
        stem_pool: bool = True,
    ) -> None:
        super().__init__()
        w = int(base_width)
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, w, 7, stride=int(stem_stride), padding=3, bias=False),
            nn.BatchNorm3d(w),
            nn.ReLU(),
            nn.MaxPool3d(3, stride=2, padding=1) if stem_pool else nn.Identity(),
        )
        widths = [w, 2 * w, 4 * w, 8 * w]
        cin = w
        for n, cout in enumerate(widths):
            stride = 1 if n == 0 else 2
            self.add_module(
                f"layer{n + 1}", nn.Sequential(_BasicBlock3d(cin, cout, stride), _BasicBlock3d(cout, cout, 1))
            )
            cin = cout
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(x)


class RegionNet(nn.Module):
    """A region model: ``members`` networks (:class:`GradCAM3DCNN`, arguments ``member``) for each
    of its ``views`` (scales), each run on its view of the input patch and on its ``flips`` - 1
    mirror images, their outputs averaged, and ``features`` of the image fused with them.

    * A view ``(crop, factor)``: the central ``crop`` voxels of the input (K, J, I), average-
      pooled by ``factor``: e.g. on a 48-voxel patch at 1 mm, ``(24, 1)`` is the nodule at 1 mm
      and ``(48, 2)`` its 48 mm surroundings at 2 mm: two scales, each member seeing one.
    * ``flips``: 1, 2, 4 or 8 test-time mirror images (none, then I, J, J+I, K, ...), each
      explained and undone before averaging.
    * The CAM layer is ``tap``: every member's and mirror image's CAM-layer output
      (:meth:`GradCAM3DCNN.evidence_map`), each put back in place on one grid over the whole patch
      (mirrors undone, crops padded with zeros, coarse grids repeated), side by side as channels.
      A CAM there is the sum of every member's own CAM, each in its place: the members' CAMs
      averaged (up to a common factor), through the engine's ordinary CAM of one layer.
    * ``features`` (names of :data:`~LungGradCAMLib.engine.models.features.FEATURES`, computed
      from the patch in HU: ``hu_window`` inverts a min-max normalised input, ``voxel_mm`` is the
      grid's voxel size) are fused with the views' mean logit differences by ``fusion``, a
      logistic regression (weights fitted on cross-validated outputs; features standardised by
      ``feature_mean``/``feature_std``): two classes only. Without features the output is the
      mean of all members' logits.

    With one member, one view and no flips it is one network on one view, as trained.
    """

    cam_layer = "tap"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        member: Optional[Dict[str, Any]] = None,
        views: Sequence[Sequence[int]] = ((32, 1),),
        members: int = 1,
        flips: int = 1,
        features: Sequence[str] = (),
        hu_window: Sequence[float] = (-1000.0, 400.0),
        voxel_mm: float = 1.0,
    ) -> None:
        super().__init__()
        from .features import FEATURES, feature_names

        #: the arguments it was built with (a member's view can be rebuilt with other flips)
        self.init_kwargs = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "member": dict(member or {}),
            "views": [list(v) for v in views],
            "members": members,
            "flips": flips,
            "features": list(features),
            "hu_window": list(hu_window),
            "voxel_mm": voxel_mm,
        }
        self.views = [(int(c), int(f)) for c, f in views]
        if not self.views or any(c < 1 or f < 1 or c % f for c, f in self.views):
            raise ValueError(f"views must be (crop, factor) pairs with crop divisible by factor; got {views}")
        if int(flips) not in (1, 2, 4, 8):
            raise ValueError(f"flips must be 1, 2, 4 or 8; got {flips}")
        if features and num_classes != 2:
            raise ValueError("image features are fused for two classes only")
        unknown = sorted(set(features) - set(FEATURES))
        if unknown:
            raise ValueError(f"unknown image feature(s) {unknown}; known: {sorted(FEATURES)}")
        self.feature_list = list(features)
        self.n_members, self.n_flips = int(members), int(flips)
        self.hu_window, self.voxel_mm = tuple(float(v) for v in hu_window), float(voxel_mm)
        kwargs = {**(member or {}), "in_channels": in_channels, "num_classes": num_classes}
        self.members = nn.ModuleList(GradCAM3DCNN(**kwargs) for _ in range(len(self.views) * self.n_members))
        self._reduction = self.members[0].evidence_reduction
        self.tap = nn.Identity()
        n_features = len(feature_names(self.feature_list))
        if self.feature_list:
            self.fusion = nn.Linear(len(self.views) + n_features, 1)
            self.register_buffer("feature_mean", torch.zeros(n_features))
            self.register_buffer("feature_std", torch.ones(n_features))

    # -- geometry ---------------------------------------------------------------------------------
    def _flip_dims(self) -> List[Tuple[int, ...]]:
        axes = (4, 3, 2)  # I, J, K of (N, C, K, J, I)
        return [tuple(a for bit, a in enumerate(axes) if n >> bit & 1) for n in range(self.n_flips)]

    def _view(self, x: torch.Tensor, view: Tuple[int, int]) -> torch.Tensor:
        """The view of ``x``: its central ``crop`` voxels (all of an axis shorter than that, e.g.
        the small probe ``load_model`` measures memory with), average-pooled by ``factor``."""
        crop, factor = view
        x = x[
            (slice(None), slice(None))
            + tuple(slice(max(0, (n - crop) // 2), max(0, (n - crop) // 2) + crop) for n in x.shape[2:])
        ]
        return F.avg_pool3d(x, factor) if factor > 1 else x

    def _cell(self) -> int:
        """Input voxels per voxel of the tap's grid: the finest view's evidence cell."""
        return min(f for _, f in self.views) * self._reduction

    def _placement(self, view: Tuple[int, int], size: Sequence[int]) -> Tuple[int, List[int]]:
        """(repeat factor, offsets per axis) of a view's evidence on the tap's grid."""
        crop, factor = view
        cell = self._cell()
        repeat = factor * self._reduction // cell
        offsets = [max(0, (n - crop) // 2) // cell for n in size]
        return repeat, offsets

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, size, flips = x.shape[0], x.shape[2:], self._flip_dims()
        cell = self._cell()
        if any(s % cell for s in size):
            raise ValueError(f"the input {tuple(size)} must be a multiple of {cell} voxels per axis")
        grid = [s // cell for s in size]
        parts, pending = [], []
        for v, view in enumerate(self.views):
            seen = self._view(x, view)
            batch = torch.cat([seen.flip(d) if d else seen for d in flips])  # (flips * N, C, ...)
            repeat, offsets = self._placement(view, size)
            for m in range(self.n_members):
                member = self.members[v * self.n_members + m]
                evidence, att = member.evidence_map(batch)
                for f, d in enumerate(flips):
                    e = evidence[f * n : (f + 1) * n]
                    e = e.flip(d) if d else e
                    if repeat > 1:
                        e = e.repeat_interleave(repeat, 2).repeat_interleave(repeat, 3).repeat_interleave(repeat, 4)
                    pad = []
                    for axis in (2, 1, 0):
                        pad += [offsets[axis], grid[axis] - offsets[axis] - e.shape[2 + axis]]
                    parts.append(F.pad(e, pad))
                pending.append((v, member, att, repeat, offsets, evidence.shape))
        tapped = self.tap(torch.cat(parts, dim=1))
        logits, start = [], 0
        for v, member, att, repeat, offsets, shape in pending:
            chunks = []
            for f, d in enumerate(flips):
                e = tapped[:, start : start + shape[1]]
                start += shape[1]
                e = e[
                    (slice(None), slice(None))
                    + tuple(slice(o, o + shape[2 + a] * repeat) for a, o in enumerate(offsets))
                ]
                if repeat > 1:
                    e = F.avg_pool3d(e, repeat)
                chunks.append(e.flip(d) if d else e)
            out = member.decide(torch.cat(chunks), att)
            logits.append((v, out.view(len(flips), n, -1).mean(dim=0)))
        if not self.feature_list:
            return torch.stack([o for _, o in logits]).mean(dim=0)
        per_view = torch.stack(
            [torch.stack([o[:, 1] - o[:, 0] for w, o in logits if w == v]).mean(dim=0) for v in range(len(self.views))],
            dim=1,
        )
        t = self.fusion(torch.cat([per_view, self.standardised_features(x)], dim=1))[:, 0]
        return torch.stack([-t / 2, t / 2], dim=1)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n) the image features of normalised input patches ``x`` (their HU from ``hu_window``)."""
        from .features import image_features

        lo, hi = self.hu_window
        return image_features(x * (hi - lo) + lo, self.voxel_mm, self.feature_list)

    def standardised_features(self, x: torch.Tensor) -> torch.Tensor:
        return (self.image_features(x) - self.feature_mean) / self.feature_std

    def auxiliary_loss(self, target: torch.Tensor) -> torch.Tensor:
        """The members' attention losses (:func:`attention_loss`) against ``target`` (N, 1, K, J, I,
        the input's grid), each on its view, mirror images included."""
        losses = []
        for v, view in enumerate(self.views):
            seen = self._view(target.float(), view)
            batch = torch.cat([seen.flip(d) if d else seen for d in self._flip_dims()])
            for m in range(self.n_members):
                logits = self.members[v * self.n_members + m].attention_logits
                if logits is None:
                    raise RuntimeError("auxiliary_loss needs members with the attention head and a forward pass")
                losses.append(attention_loss(logits, batch))
        return torch.stack(losses).mean()


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(),
    )


class UNet3D(nn.Module):
    """A small 3D U-Net (Ronneberger et al. / Cicek et al.): ``depth`` 2x poolings, two 3x3x3
    convolutions with batch norm and ReLU per level, ``width`` x 1, 2, 4, ... filters, transposed
    convolutions up, skip connections by concatenation, a 1x1x1 convolution to ``num_classes``
    logits per voxel. Any input size works: it is padded (edge values) to a multiple of
    ``2 ** depth`` and the output cropped back, so the output has the input's K, J, I.

    ``cam_layer`` is the bottleneck: the network is a segmenter (its card's ``output`` is
    ``"mask"``), not explained with a heat map; the name is there for the card.
    """

    cam_layer = "bottleneck"

    def __init__(self, in_channels: int = 1, num_classes: int = 1, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        if not 1 <= int(depth) <= 5:
            raise ValueError("unet3d needs 1 <= depth <= 5")
        widths = [int(width) * 2**n for n in range(int(depth) + 1)]
        self.depth = int(depth)
        self.down = nn.ModuleList(
            [_double_conv(cin, cout) for cin, cout in zip([in_channels] + widths[:-2], widths[:-1])]
        )
        self.pool = nn.MaxPool3d(2)
        self.bottleneck = _double_conv(widths[-2], widths[-1])
        self.up = nn.ModuleList(
            [nn.ConvTranspose3d(widths[n + 1], widths[n], 2, stride=2) for n in reversed(range(self.depth))]
        )
        self.merge = nn.ModuleList([_double_conv(2 * widths[n], widths[n]) for n in reversed(range(self.depth))])
        self.head = nn.Conv3d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        step = 2**self.depth
        pad = [p for n in reversed(size) for p in (0, -n % step)]  # F.pad's order: I, J, K
        if any(pad):
            x = nn.functional.pad(x, pad, mode="replicate")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)[:, :, : size[0], : size[1], : size[2]]


#: architecture name -> class; ``build_model`` and model cards use these names.
CLASSIFIERS = {
    "gradcam3d_cnn": GradCAM3DCNN,
    "small3d_cnn": Small3DCNN,
    "resnet18_3d": ResNet18_3D,
    "region_net": RegionNet,
}
#: Networks whose output is a mask (logits per voxel), for model cards with ``output = "mask"``.
SEGMENTERS = {"unet3d": UNet3D}
ARCHITECTURES = {**CLASSIFIERS, **SEGMENTERS}
