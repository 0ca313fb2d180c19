"""The CAM engine (LungGradCAMLib.engine.cam) on small random 3D CNNs, on the CPU: each method against
its definition computed directly (split network, plain autograd), per-sample targets, binary
single-logit models, in-place ReLU, and the model left exactly as it was."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from LungGradCAMLib.core.errors import CamError
from LungGradCAMLib.engine.cam import CAM, METHODS, CamResult, compute_cam, default_layer, minmax_per_sample

from helpers import SHAPE, make_input, make_net

GRADIENT_METHODS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam")


def split_at(net: nn.Sequential, layer: str):
    """(features, head): the network cut after ``layer``."""
    k = list(net._modules).index(layer) + 1
    return net[:k], net[k:]


def target_score(out: torch.Tensor, classes) -> torch.Tensor:
    classes = torch.as_tensor(classes)
    if out.shape[1] == 1:
        return torch.where(classes == 1, out[:, 0], -out[:, 0])
    return out[torch.arange(len(out)), classes]


def direct_grads(net: nn.Sequential, x: torch.Tensor, classes, layer: str = "act2"):
    """Activations and dScore/dA at ``layer`` by plain autograd on the split network."""
    features, head = split_at(net, layer)
    a = features(x).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(target_score(head(a), classes).sum(), a)
    return a.detach(), g


def definition(method: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each method's map at feature resolution, written from the papers in numpy."""
    a, g = a.numpy(), g.numpy()
    axes = (2, 3, 4)
    if method == "gradcam":
        w = g.mean(axis=axes)
        m = np.einsum("nc,ncdhw->ndhw", w, a)
    elif method == "gradcam++":
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = g**2 / (2 * g**2 + a.sum(axis=axes)[..., None, None, None] * g**3)
        alpha = np.where(g != 0, alpha, 0.0)
        w = (alpha * np.maximum(g, 0)).sum(axis=axes)
        m = np.einsum("nc,ncdhw->ndhw", w, a)
    elif method == "xgradcam":
        w = (g * a).sum(axis=axes) / a.sum(axis=axes)
        m = np.einsum("nc,ncdhw->ndhw", w, a)
    elif method == "hirescam":
        m = (g * a).sum(axis=1)
    elif method == "layercam":
        m = (np.maximum(g, 0) * a).sum(axis=1)
    else:
        raise AssertionError(method)
    return torch.from_numpy(np.maximum(m, 0))


def close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    ref = ref.to(ours.dtype)
    scale = float(ref.abs().max())
    assert scale > 0, "reference map is all zero: the test would prove nothing"
    assert torch.allclose(ours, ref, rtol=rtol, atol=rtol * scale), float((ours - ref).abs().max())


# --------------------------------------------------------------------------------------------
# definitions
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_gradient_methods_match_their_definitions(method):
    net, x, classes = make_net(), make_input(3), [2, 0, 1]
    ours = compute_cam(net, x, method=method, target=classes, upsample=False, normalize=False)
    a, g = direct_grads(net, x, classes)
    assert ours.shape == (3, 4, 4, 4) and ours.dtype == torch.float32
    close(ours, definition(method, a, g))


def test_methods_differ_from_each_other():
    net, x = make_net(), make_input(1)
    maps = {m: minmax_per_sample(compute_cam(net, x, method=m, target=1, upsample=False)) for m in GRADIENT_METHODS}
    for i, m1 in enumerate(GRADIENT_METHODS):
        for m2 in GRADIENT_METHODS[i + 1 :]:
            assert not torch.allclose(maps[m1], maps[m2], atol=1e-3), (m1, m2)


def test_upsampling_is_trilinear_and_normalisation_per_sample():
    net, x = make_net(), make_input(2)
    raw = compute_cam(net, x, target=[0, 1], upsample=False, normalize=False)
    up = compute_cam(net, x, target=[0, 1], normalize=False)
    final = compute_cam(net, x, target=[0, 1])
    expected = F.interpolate(raw[:, None], size=SHAPE, mode="trilinear", align_corners=False)[:, 0]
    close(up, expected)
    assert final.shape == (2,) + SHAPE
    for n in range(2):
        assert float(final[n].min()) == 0.0 and float(final[n].max()) == pytest.approx(1.0)
        lo, hi = up[n].min(), up[n].max()
        close(final[n], (up[n] - lo) / (hi - lo))


def test_minmax_of_a_constant_sample_is_zero():
    t = torch.stack([torch.full((2, 2, 2), 3.0), torch.arange(8.0).reshape(2, 2, 2)])
    out = minmax_per_sample(t)
    assert torch.equal(out[0], torch.zeros(2, 2, 2))
    assert float(out[1].max()) == 1.0 and float(out[1].min()) == 0.0


@pytest.mark.parametrize("dead", [False, True])
def test_scorecam_matches_its_definition_across_channel_batches(dead):
    """Masked inputs batched across samples and channels (12 of them, 5 at a time); with
    ``dead``, channels 0 and 3 never fire (all-zero masks: the model scores x * 0 once)."""
    net, x, classes = make_net(), make_input(2), [1, 2]
    if dead:
        with torch.no_grad():
            net.conv2.bias[[0, 3]] = -1e3
    with CAM(net, method="scorecam", upsample=False, normalize=False, score_batch_size=5) as cam:
        ours = cam(x, classes).cam
    features, _ = split_at(net, "act2")
    with torch.no_grad():
        a = features(x)
        expected = []
        for n in range(2):
            scores = []
            for c in range(a.shape[1]):
                mask = F.interpolate(a[n : n + 1, c : c + 1], size=SHAPE, mode="trilinear", align_corners=False)
                span = mask.max() - mask.min()
                mask = (mask - mask.min()) / span if span > 0 else torch.zeros_like(mask)
                scores.append(net(x[n : n + 1] * mask)[0, classes[n]])
            w = torch.softmax(torch.stack(scores), 0)
            assert not dead or (a[n, [0, 3]] == 0).all()
            expected.append(F.relu((w[:, None, None, None] * a[n]).sum(0)))
    close(ours, torch.stack(expected))


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x > 0) * (g > 0)


class _GuidedReLUModule(nn.Module):
    def forward(self, x):
        return _GuidedReLU.apply(x)


def direct_guided_backprop(net: nn.Sequential, x: torch.Tensor, classes) -> torch.Tensor:
    guided = copy.deepcopy(net)
    for name, module in guided.named_children():
        if isinstance(module, nn.ReLU):
            setattr(guided, name, _GuidedReLUModule())
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(target_score(guided(xg), classes).sum(), xg)
    return F.relu(g.sum(1))


@pytest.mark.parametrize("inplace", [False, True])
def test_guided_backprop_and_guided_gradcam_match_their_definitions(inplace):
    net, x, classes = make_net(inplace=inplace), make_input(2), [0, 2]
    guided = direct_guided_backprop(make_net(inplace=False), x, classes)
    ours = compute_cam(net, x, method="guided-backprop", target=classes, normalize=False)
    close(ours, guided)
    a, g = direct_grads(make_net(inplace=False), x, classes)
    grad_cam = F.interpolate(definition("gradcam", a, g)[:, None], size=SHAPE, mode="trilinear", align_corners=False)[
        :, 0
    ]
    ours = compute_cam(net, x, method="guided-gradcam", target=classes, normalize=False)
    close(ours, guided * grad_cam)


# --------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_batch_with_different_targets_equals_single_samples(method):
    net, x, classes = make_net(), make_input(3), [2, 0, 1]
    batch = compute_cam(net, x, method=method, target=classes)
    for n, c in enumerate(classes):
        single = compute_cam(net, x[n : n + 1], method=method, target=c)
        close(batch[n : n + 1], single)
    # None = each sample's own predicted class
    predicted = net(x).argmax(1).tolist()
    batch = compute_cam(net, x, method=method)
    for n, c in enumerate(predicted):
        close(batch[n : n + 1], compute_cam(net, x[n : n + 1], method=method, target=c))


def test_result_carries_the_scores_of_the_same_forward_pass():
    net, x = make_net(), make_input(2)
    with CAM(net) as cam:
        result = cam(x, [1, 2])
    assert isinstance(result, CamResult)
    logits = net(x).detach().float()
    assert torch.allclose(result.logits, logits)
    assert torch.equal(result.classes, torch.tensor([1, 2]))
    assert torch.allclose(result.scores, logits[[0, 1], [1, 2]])
    assert torch.allclose(result.probabilities, torch.softmax(logits, 1))
    assert torch.allclose(result.target_probability, torch.softmax(logits, 1)[[0, 1], [1, 2]])


def test_binary_single_logit_model():
    net, x = make_net(classes=1), make_input(4, seed=5)
    logit = net(x)[:, 0].detach()
    assert (logit > 0).any() and (logit <= 0).any(), "pick a seed with both predictions"
    a, g = direct_grads(net, x, [1, 1, 1, 1])  # g = dlogit/dA
    m = torch.einsum("nc,ncdhw->ndhw", g.mean((2, 3, 4)), a)
    with CAM(net, upsample=False, normalize=False) as cam:
        close(cam(x, 1).cam, F.relu(m))
        close(cam(x, 0).cam, F.relu(-m))  # class 0 explains minus the logit
        result = cam(x)
    assert torch.equal(result.classes, (logit > 0).long())
    p = torch.sigmoid(logit.float())
    assert torch.allclose(result.probabilities, torch.stack([1 - p, p], 1))
    assert torch.allclose(result.target_probability, torch.where(logit > 0, p, 1 - p))
    assert torch.equal(cam(x, -1).classes, torch.ones(4, dtype=torch.long))  # -1 = class 1


def test_callable_and_negative_targets():
    net, x = make_net(), make_input(2)
    contrast = compute_cam(net, x, target=lambda out: out[:, 1] - out[:, 0], upsample=False, normalize=False)
    a, g1 = direct_grads(net, x, [1, 1])
    _, g0 = direct_grads(net, x, [0, 0])
    close(contrast, definition("gradcam", a, g1 - g0))
    assert torch.equal(compute_cam(net, x, target=-1), compute_cam(net, x, target=2))
    assert torch.equal(compute_cam(net, x, target=torch.tensor([2, 0])), compute_cam(net, x, target=np.array([2, 0])))


# --------------------------------------------------------------------------------------------
# in-place ReLU and hygiene
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [None, "conv2"])
@pytest.mark.parametrize("method", GRADIENT_METHODS + ("scorecam",))
def test_inplace_relu_after_the_layer_gives_the_same_cam(method, layer):
    x = make_input(2)
    plain = compute_cam(make_net(inplace=False), x, method=method, layer=layer, target=[0, 1], normalize=False)
    inplace = compute_cam(make_net(inplace=True), x, method=method, layer=layer, target=[0, 1], normalize=False)
    close(inplace, plain)
    assert float(plain.max()) > 0


def test_cam_at_the_conv_uses_pre_relu_activations():
    net, x = make_net(inplace=True), make_input(1)
    a, g = direct_grads(make_net(), x, [1], layer="conv2")
    assert (a < 0).any()
    close(compute_cam(net, x, layer=net.conv2, target=1, upsample=False, normalize=False), definition("gradcam", a, g))


def snapshot(net: nn.Module):
    return (
        [m.training for m in net.modules()],
        [p.requires_grad for p in net.parameters()],
        [b.clone() for b in net.buffers()],
    )


def assert_untouched(net: nn.Module, before) -> None:
    modes, requires, buffers = before
    assert [m.training for m in net.modules()] == modes
    assert [p.requires_grad for p in net.parameters()] == requires
    assert all(torch.equal(b, b0) for b, b0 in zip(net.buffers(), buffers))  # BN stats too
    assert all(p.grad is None for p in net.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks for m in net.modules())


def mixed_state_net(inplace: bool = False) -> nn.Sequential:
    net = make_net(inplace=inplace).train()
    net.bn1.eval()
    net.conv1.weight.requires_grad_(False)
    return net


@pytest.mark.parametrize("method", METHODS)
def test_model_is_left_exactly_as_it_was(method):
    net = mixed_state_net(inplace=True)
    before = snapshot(net)
    x = make_input(2)
    first = compute_cam(net, x, method=method, target=[0, 1])
    assert_untouched(net, before)
    again = compute_cam(net, x, method=method, target=[0, 1])
    assert torch.equal(first, again)  # eval mode inside: dropout/BN statistics were not used


def test_hooks_removed_and_state_restored_on_exceptions():
    net = mixed_state_net()
    before = snapshot(net)
    with pytest.raises(ZeroDivisionError):
        with CAM(net) as cam:
            assert net.act2._forward_hooks
            cam(make_input(1), 0)
            1 / 0
    assert_untouched(net, before)

    def failing_target(out):
        raise RuntimeError("target failed")

    with pytest.raises(RuntimeError, match="target failed"):
        compute_cam(net, make_input(1), target=failing_target)
    assert_untouched(net, before)
    with pytest.raises(CamError):
        compute_cam(net, make_input(1), target=7)
    assert_untouched(net, before)


def test_reusable_object_and_grad_free_callers():
    net, x = make_net(), make_input(2)
    expected = compute_cam(net, x)
    with CAM(net) as cam:
        assert torch.equal(cam(x).cam, expected)
        assert torch.equal(cam(x).cam, expected)
        assert len(net.act2._forward_hooks) == 1
        with torch.no_grad():
            assert torch.equal(cam(x).cam, expected)
        with torch.inference_mode():
            assert torch.equal(cam(x).cam, expected)
    cam = CAM(net)  # called outside a with block: installs and removes the hook itself
    assert torch.equal(cam(x).cam, expected) and not net.act2._forward_hooks


def test_integer_input_and_amp_on_cpu():
    net = make_net(dtype=torch.float32)
    x = (make_input(1, dtype=torch.float32) * 100).round()
    expected = compute_cam(net, x)
    assert torch.equal(compute_cam(net, x.to(torch.int16)), expected)
    assert torch.equal(compute_cam(net, x, amp=True), expected)  # autocast only on CUDA


# --------------------------------------------------------------------------------------------
# layers and bad input
# --------------------------------------------------------------------------------------------
def test_default_layer():
    assert default_layer(make_net()) == "act2"
    conv_bn_relu = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.ReLU(), nn.MaxPool3d(2))
    assert default_layer(conv_bn_relu) == "2"
    conv_pool = nn.Sequential(nn.Conv3d(1, 2, 3), nn.MaxPool3d(2), nn.ReLU())
    assert default_layer(conv_pool) == "0"
    nested = nn.Sequential(nn.Sequential(nn.Conv3d(1, 2, 3), nn.ReLU()), nn.Flatten())
    assert default_layer(nested) == "0.1"


@pytest.mark.parametrize(
    "name,kwargs", [("gradcam3d_cnn", {"width": 2}), ("small3d_cnn", {"channels": (2, 3, 4), "hidden": (4, 4)})]
)
def test_default_layer_of_the_bundled_architectures(name, kwargs):
    from LungGradCAMLib.engine.models import build_model

    torch.manual_seed(0)
    net = build_model(name, **kwargs)
    assert default_layer(net) == net.cam_layer
    x = torch.randn(2, 1, 16, 16, 16)
    # LayerCAM: a random network's Grad-CAM may be all negative evidence (a zero map)
    cam = compute_cam(net, x, method="layercam", target=1)
    assert cam.shape == (2, 16, 16, 16) and float(cam.max()) == pytest.approx(1.0)


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.act = nn.ReLU()
        self.unused = nn.Conv3d(2, 2, 1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(self.act(self.act(self.conv(x))).mean((2, 3, 4)))


@pytest.mark.parametrize(
    "kwargs,call,match",
    [
        ({"method": "gradcam+++"}, {}, "unknown CAM method 'gradcam\\+\\+\\+'"),
        ({"layer": "features.nope"}, {}, "layer 'features.nope' is not a module"),
        ({"layer": nn.Conv3d(1, 1, 1)}, {}, "not part of the model"),
        ({"layer": "fc"}, {}, "outputs \\(2, 2\\).*5-D"),
        ({}, {"target": 3}, "out of range"),
        ({}, {"target": [0, 1, 1]}, "3 classes for a batch of 2"),
        ({}, {"target": 0.5}, "integer class indices"),
        ({}, {"target": "benign"}, "target must be None"),
        ({}, {"target": lambda out: out.sum()}, "one score per sample"),
        ({}, {"target": lambda out: torch.zeros(len(out), requires_grad=True)}, "does not depend"),
        ({}, {"x": torch.zeros(1, 8, 8, 8)}, "5-D"),
    ],
)
def test_bad_arguments_raise_cam_errors(kwargs, call, match):
    net = make_net(classes=3)
    net.fc = nn.Linear(6 * 64, 2).double()
    x = call.pop("x", make_input(2))
    with pytest.raises(CamError, match=match):
        compute_cam(net, x, **kwargs, **call)


def test_bad_layers_and_models():
    x = torch.randn(1, 1, 4, 4, 4)
    with pytest.raises(CamError, match="ran 2 times"):
        compute_cam(_TwoHeads(), x, layer="act")
    with pytest.raises(CamError, match="ran 0 times"):
        compute_cam(_TwoHeads(), x, layer="unused")
    with pytest.raises(CamError, match="no Conv3d"):
        compute_cam(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), x)
    elu = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ELU(), nn.Flatten(), nn.Linear(128, 2))
    with pytest.raises(CamError, match="no nn.ReLU"):
        compute_cam(elu, x, method="guided-backprop")
    from LungGradCAMLib.engine.cam import GradCAM

    with pytest.raises(CamError, match="not 'layercam'"):
        GradCAM(elu, method="layercam")
    assert type(CAM(elu, method="Grad-CAM++")).__name__ == "GradCAMPlusPlus"
    with pytest.raises(CamError, match="torch.nn.Module"):
        CAM("model.pt")


@pytest.mark.gpu
def test_cuda_matches_cpu_and_amp_is_close():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    net, x = make_net(dtype=torch.float32), make_input(2, dtype=torch.float32)
    for method in METHODS:
        cpu = compute_cam(net, x, method=method, target=[0, 1])
        gpu = compute_cam(net.cuda(), x.cuda(), method=method, target=[0, 1])
        assert gpu.is_cuda
        assert torch.allclose(gpu.cpu(), cpu, atol=1e-4), method
        half = compute_cam(net, x.cuda(), method=method, target=[0, 1], amp=True).cpu()
        corr = np.corrcoef(half.flatten().numpy(), cpu.flatten().numpy())[0, 1]
        assert corr > 0.99, (method, corr)
        net.cpu()


def test_sigmoid_activation_is_one_vs_rest():
    two = make_net(classes=2)
    x = make_input(3, seed=4)
    logits = two(x).detach().float()
    with CAM(two, activation="sigmoid") as cam:
        result = cam(x, 0)
    assert result.activation == "sigmoid"
    assert torch.allclose(result.probabilities, torch.sigmoid(logits))
    assert torch.allclose(result.target_probability, torch.sigmoid(logits[:, 0]))
    assert torch.equal(result.cam, compute_cam(two, x, target=0))  # same score: logit 0
    # one logit, sigmoid: class 0 IS the logit (softmax mode would explain minus the logit)
    one = make_net(classes=1)
    logit = one(x)[:, 0].detach()
    raw = compute_cam(one, x, target=0, activation="sigmoid", normalize=False, upsample=False)
    close(raw, compute_cam(one, x, target=1, normalize=False, upsample=False))
    with CAM(one, activation="sigmoid") as cam:
        result = cam(x)
    assert torch.equal(result.classes, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(result.target_probability, torch.sigmoid(logit.float()))
    with pytest.raises(CamError, match="out of range"):
        compute_cam(one, x, target=1, activation="sigmoid")
    with pytest.raises(CamError, match="activation must be"):
        CAM(one, activation="relu")


# several layers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_several_layers_fuse_each_layers_own_map(method, inplace):
    """``layer="act1+act2"``: the geometric mean of the layers' own (upsampled, min-max scaled)
    maps, each with exactly the gradient a one-layer CAM at that layer gets."""
    net, x, classes = make_net(inplace=inplace), make_input(2), [2, 0]
    fused = compute_cam(net, x, method=method, target=classes, layer="act1+act2", normalize=False)
    single = [compute_cam(net, x, method=method, target=classes, layer=name) for name in ("act1", "act2")]
    close(fused, torch.sqrt(single[0] * single[1]))
    assert compute_cam(net, x, method=method, target=classes, layer=["act2", "act1"]).shape == (2,) + SHAPE
    assert all(p.requires_grad for p in net.parameters()) and not net.training


def test_several_layers_errors():
    net, x = make_net(), make_input(1)
    with pytest.raises(CamError, match="takes one layer"):
        compute_cam(net, x, method="scorecam", layer="act1+act2")
    with pytest.raises(CamError, match="twice"):
        compute_cam(net, x, layer="act2+act2")
    with pytest.raises(CamError, match="not a module"):
        compute_cam(net, x, layer="act1+nothing")
    with pytest.raises(CamError, match="input size"):
        compute_cam(net, x, layer="act1+act2", upsample=False)
