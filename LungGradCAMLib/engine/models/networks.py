"""The 3D CNN architectures. Inputs are (N, C, K, J, I) tensors (K = slice axis); outputs are
(N, num_classes) logits, or for the segmentation network (:class:`UNet3D`, ``output = "mask"``)
(N, num_classes, K, J, I) logits per voxel. Each class names its default Grad-CAM target layer in
``cam_layer`` (a dotted module name for ``module.get_submodule``).
"""
from __future__ import annotations

from typing import Sequence

import torch
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
      compact width (see its card).

    The CAM target is ``features.act6``: the ReLU output of the last convolution, at 1/8 of the
    input resolution (before the last pool).
    """

    cam_layer = "features.act6"

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 32,
                 dropout: float = 0.3) -> None:
        super().__init__()
        w = int(width)
        c1, c2, c3, c4, c5, c6 = w, 2 * w, 4 * w, 4 * w, 8 * w, 16 * w
        layers = [
            ("conv1", nn.Conv3d(in_channels, c1, 3, padding=1)), ("act1", nn.ReLU()),
            ("pool1", _pool()), ("bn1", nn.BatchNorm3d(c1)),
            ("conv2", nn.Conv3d(c1, c2, 3, padding=1)), ("act2", nn.ReLU()),
            ("pool2", _pool()), ("bn2", nn.BatchNorm3d(c2)),
            ("conv3", nn.Conv3d(c2, c3, 3, padding=1)), ("act3", nn.ReLU()),
            ("conv4", nn.Conv3d(c3, c4, 3, padding=1)), ("act4", nn.ReLU()),
            ("pool4", _pool()), ("bn4", nn.BatchNorm3d(c4)),
            ("conv5", nn.Conv3d(c4, c5, 1)), ("act5", nn.ReLU()),
            ("conv6", nn.Conv3d(c5, c6, 1)), ("act6", nn.ReLU()),
            ("pool6", _pool()), ("bn6", nn.BatchNorm3d(c6)),
        ]
        self.features = nn.Sequential()
        for name, layer in layers:
            self.features.add_module(name, layer)
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(c6, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


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

    def __init__(self, in_channels: int = 1, num_classes: int = 2,
                 channels: Sequence[int] = (16, 32, 64), hidden: Sequence[int] = (128, 64),
                 pooled: Sequence[int] = (2, 2, 2), dropout: float = 0.5) -> None:
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
            nn.AdaptiveAvgPool3d(tuple(int(p) for p in pooled)), nn.Flatten(),
            nn.Linear(c[3] * cells, h1), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(h1, h2), nn.ReLU(), nn.Dropout(dropout),
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
            self.downsample = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm3d(cout))

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

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_width: int = 64,
                 stem_stride: int = 2, stem_pool: bool = True) -> None:
        super().__init__()
        w = int(base_width)
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, w, 7, stride=int(stem_stride), padding=3, bias=False),
            nn.BatchNorm3d(w), nn.ReLU(),
            nn.MaxPool3d(3, stride=2, padding=1) if stem_pool else nn.Identity(),
        )
        widths = [w, 2 * w, 4 * w, 8 * w]
        cin = w
        for n, cout in enumerate(widths):
            stride = 1 if n == 0 else 2
            self.add_module(f"layer{n + 1}", nn.Sequential(_BasicBlock3d(cin, cout, stride),
                                                           _BasicBlock3d(cout, cout, 1)))
            cin = cout
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(x)


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(),
                         nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU())


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
        widths = [int(width) * 2 ** n for n in range(int(depth) + 1)]
        self.depth = int(depth)
        self.down = nn.ModuleList([_double_conv(cin, cout) for cin, cout in zip([in_channels] + widths[:-2],
                                                                              widths[:-1])])
        self.pool = nn.MaxPool3d(2)
        self.bottleneck = _double_conv(widths[-2], widths[-1])
        self.up = nn.ModuleList([nn.ConvTranspose3d(widths[n + 1], widths[n], 2, stride=2)
                                 for n in reversed(range(self.depth))])
        self.merge = nn.ModuleList([_double_conv(2 * widths[n], widths[n]) for n in reversed(range(self.depth))])
        self.head = nn.Conv3d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        step = 2 ** self.depth
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
        return self.head(x)[:, :, :size[0], :size[1], :size[2]]


#: architecture name -> class; ``build_model`` and model cards use these names.
CLASSIFIERS = {
    "gradcam3d_cnn": GradCAM3DCNN,
    "small3d_cnn": Small3DCNN,
    "resnet18_3d": ResNet18_3D,
}
#: Networks whose output is a mask (logits per voxel), for model cards with ``output = "mask"``.
SEGMENTERS = {"unet3d": UNet3D}
ARCHITECTURES = {**CLASSIFIERS, **SEGMENTERS}
