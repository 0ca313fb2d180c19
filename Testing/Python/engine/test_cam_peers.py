"""Differential tests of our CAMs against the peers, on random 3D CNNs, on the CPU: captum
``LayerGradCam`` (+ trilinear interpolate), MONAI ``GradCAM`` (identity postprocessing) and
pytorch-grad-cam ``GradCAM`` / ``GradCAMPlusPlus`` / ``LayerCAM`` (at feature resolution: it
upsamples with a cubic spline). Agreement: correlation >= 0.9999 and max |difference| <= 1e-4
after the same per-sample min-max normalisation.

Peer bugs confirmed here (MONAI 1.6.1, captum 0.9.0; pytorch-grad-cam 1.5.7 read, not
run — it imports torchvision):

* MONAI ``ModelWithHooks.class_score`` is ``logits[:, class_idx].squeeze()``: with a tensor of
  per-sample classes (also the default argmax of a batch whose samples predict different
  classes) it sums an (N, N) block, so every sample gets the gradient of every sample's class
  (max |difference| 1.0 and 0.39 on the two samples of our test batch). We compare it one
  sample at a time.
* MONAI registers its forward and backward hooks for good (never removed), sets ``inplace=False``
  on the hooked module permanently, and leaves ``.grad`` on every parameter (full backward).
* MONAI ``GradCAMpp`` uses ``sum_xyz(A g^3)`` where eq. 19 of Chattopadhay et al. has
  ``(sum_xyz A) g^3`` (our maps differ from it by 0.03-0.09 after normalisation).
* pytorch-grad-cam Grad-CAM++ adds eps = 1e-6 to the denominator ``2 g^2 + (sum A) g^3``; with
  the small gradients of real networks (g ~ 1e-3, g^2 ~ 1e-6) eps dominates and biases alpha. Our
  comparison scales the head so that gradients are O(1), where eps is negligible.
* pytorch-grad-cam stores ``activation.cpu().detach()`` in its forward hook: on the CPU that is
  the layer's own storage, so an in-place ReLU after a hooked conv turns the stored activations
  into post-ReLU values while the gradients stay pre-ReLU (on a GPU, ``.cpu()`` copies first).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from LungGradCAMLib.engine.cam import compute_cam, minmax_per_sample

from helpers import SHAPE, make_input, make_net

CLASSES = [2, 0, 1]


def assert_agree(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    ours = minmax_per_sample(ours.detach().double())
    theirs = minmax_per_sample(
        torch.as_tensor(np.asarray(theirs.detach() if isinstance(theirs, torch.Tensor) else theirs))
        .double()
        .reshape(ours.shape)
    )
    assert float(theirs.max()) > 0, "the peer's map is all zero: the comparison would prove nothing"
    for n in range(len(ours)):
        corr = np.corrcoef(ours[n].flatten().numpy(), theirs[n].flatten().numpy())[0, 1]
        assert corr >= 0.9999, (n, corr)
    assert float((ours - theirs).abs().max()) <= 1e-4, float((ours - theirs).abs().max())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layer", ["act2", "conv2"])
def test_gradcam_equals_captum_layer_gradcam(seed, layer):
    from captum.attr import LayerAttribution, LayerGradCam

    net, x = make_net(seed=seed, dtype=torch.float32), make_input(3, seed=seed, dtype=torch.float32)
    attribution = LayerGradCam(net, getattr(net, layer)).attribute(x, target=CLASSES, relu_attributions=True)
    theirs = LayerAttribution.interpolate(attribution, SHAPE, interpolate_mode="trilinear")[:, 0]
    ours = compute_cam(net, x, target=CLASSES, layer=layer)
    assert_agree(ours, theirs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcam_equals_monai_gradcam(seed):
    from monai.visualize import GradCAM as MonaiGradCAM

    x = make_input(3, seed=seed, dtype=torch.float32)
    ours = compute_cam(make_net(seed=seed, dtype=torch.float32), x, target=CLASSES)
    # MONAI mutates the model and leaves hooks on it: give it its own copy
    monai = MonaiGradCAM(
        nn_module=make_net(seed=seed, dtype=torch.float32), target_layers="act2", postprocessing=lambda t: t
    )
    # one sample at a time: MONAI mixes the classes of a batch (see the module docstring)
    theirs = torch.cat([monai(x[n : n + 1], class_idx=c)[:, 0] for n, c in enumerate(CLASSES)])
    assert_agree(ours, theirs)


def _pytorch_grad_cam_feature_map(cls_name: str, net, layer, x: torch.Tensor, classes):
    """A pytorch-grad-cam method's map before its upsampling (its own ``get_cam_image`` on the
    activations and gradients its hooks captured), ReLU applied as in its ``compute_cam_per_layer``."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = [ClassifierOutputTarget(c) for c in classes]
    with getattr(pgc, cls_name)(model=net, target_layers=[layer]) as cam:
        cam(input_tensor=x, targets=targets)
        acts = cam.activations_and_grads.activations[0].cpu().numpy()
        grads = cam.activations_and_grads.gradients[0].cpu().numpy()
        fmap = cam.get_cam_image(x, layer, targets, acts, grads, False)
    fmap = fmap.cpu().numpy() if isinstance(fmap, torch.Tensor) else np.asarray(fmap)
    return np.maximum(fmap, 0)


@pytest.mark.parametrize(
    "method,cls_name", [("gradcam", "GradCAM"), ("gradcam++", "GradCAMPlusPlus"), ("layercam", "LayerCAM")]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_methods_equal_pytorch_grad_cam_at_feature_resolution(method, cls_name, seed):
    x = make_input(3, seed=seed, dtype=torch.float32)

    def net():
        model = make_net(seed=seed, dtype=torch.float32)
        with torch.no_grad():  # O(1) gradients, where pytorch-grad-cam's Grad-CAM++ eps is negligible
            model.fc.weight.mul_(1000.0)
        return model

    ours = compute_cam(net(), x, method=method, target=CLASSES, upsample=False)
    theirs_net = net()
    theirs = _pytorch_grad_cam_feature_map(cls_name, theirs_net, theirs_net.act2, x, CLASSES)
    assert_agree(ours, torch.from_numpy(theirs))
