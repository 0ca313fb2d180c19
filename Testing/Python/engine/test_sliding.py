"""The sliding-window CAM (LungGradCAMLib.engine.sliding) on small random 3D CNNs, on the CPU: patch
grid and air padding, Gaussian blending against a direct computation, progress, cancellation,
and out-of-memory recovery (a CUDA out-of-memory error injected by a model wrapper)."""

from __future__ import annotations

import itertools
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from LungGradCAMLib.core.errors import CamError, CancelledError, InvalidInputError, ResourceError
from LungGradCAMLib.engine.cam import compute_cam
from LungGradCAMLib.engine.sliding import sliding_cam


def make_net(seed: int = 0) -> nn.Module:
    """Any patch of >= 4 voxels a side; the pooled linear head makes gradients vary in space."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool3d(2),
        nn.Conv3d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(2),
        nn.Flatten(),
        nn.Linear(6 * 8, 2),
    ).eval()


def make_volume(shape, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 300 - 500


def window(hu: torch.Tensor) -> torch.Tensor:
    return (hu.clamp(-1024, 400) + 1024) / 1424


class Recorder(nn.Module):
    """Runs ``net`` and keeps the inputs it saw."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)


class Faulty(nn.Module):
    """Runs ``net`` after ``fault(x)``, which may raise an out-of-memory error. ``fault`` is a
    plain function, so a deep copy of this module (the CPU fallback) shares its state."""

    def __init__(self, net: nn.Module, fault) -> None:
        super().__init__()
        self.net = net
        self.fault = fault

    def forward(self, x):
        self.fault(x)
        return self.net(x)


def oom():
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


@pytest.fixture
def one_thread():
    """torch on one intra-op thread: the CPU path then runs one explainer, so a test sees the
    batches exactly as sliding_cam forms them (with N threads, N workers each get a share)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gaussian(p: int) -> np.ndarray:
    d = np.arange(p) - (p - 1) / 2
    g = np.exp(-0.5 * (d / (0.125 * p)) ** 2)
    return g / g.max()


def test_single_patch_equals_the_cam_of_that_patch():
    """One patch: its map min-max scaled within the patch times its probability (the absolute
    scale); the relative view scales the same map to a maximum of 1."""
    net, vol = make_net(), make_volume((16, 16, 16))
    result = sliding_cam(net, vol, 16, 16, method="layercam", preprocess=window)
    x = window(vol)[None, None]
    raw = compute_cam(net, x, method="layercam", target=-1, normalize=False)[0]
    scaled = (raw - raw.min()) / (raw.max() - raw.min())
    p = float(torch.softmax(net(x).detach(), 1)[0, 1])
    assert result.cam.dtype == np.float32 and result.cam.shape == (16, 16, 16)
    assert np.allclose(result.cam, p * scaled.numpy(), atol=1e-6)
    relative = sliding_cam(net, vol, 16, 16, method="layercam", preprocess=window, scale="relative")
    assert np.allclose(relative.cam, scaled.numpy(), atol=1e-6)
    assert len(result.patch_scores) == 1 and result.patch_scores[0].box == ((0, 16),) * 3
    assert result.max_score == pytest.approx(p, abs=1e-6)
    assert result.patch_scores[0].probabilities == pytest.approx((1 - p, p), abs=1e-6)
    assert np.allclose(result.score_map, p, atol=1e-6)


def test_edge_patches_are_padded_with_air_before_preprocessing():
    net, vol = Recorder(make_net()), make_volume((10, 12, 14))
    result = sliding_cam(net, vol, 16, 8, layer="net.4", preprocess=window)
    assert len(net.seen) == 1  # one patch: one forward pass gives its map and score
    seen = net.seen[0][0, 0]
    assert seen.shape == (16, 16, 16)
    assert torch.equal(seen[:10, :12, :14], window(vol))
    pad = seen.clone()
    pad[:10, :12, :14] = float(window(torch.tensor(-1024.0)))
    assert torch.equal(pad, torch.full_like(pad, float(window(torch.tensor(-1024.0)))))
    assert result.cam.shape == (10, 12, 14)
    assert result.patch_scores[0].box == ((0, 16), (0, 16), (0, 16))


def test_patch_grid_covers_the_roi_and_nothing_else():
    vol = make_volume((20, 24, 30))
    roi = ((2, 18), (0, 24), (3, 29))
    result = sliding_cam(make_net(), vol, 8, (4, 6, 8), method="layercam", roi=roi, batch_size=5, preprocess=window)
    # every stride from the box's start; the last j and i patches, which would reach 26 > 24 and
    # 35 > 30, end at the volume's edge instead: no patch is padded with air where the scan's edge
    # cuts it (k's last one ends at 18, inside the volume, and stays)
    starts = [range(2, 2 + 3 * 4, 4), [0, 6, 12, 16], [3, 11, 19, 22]]
    expected = [tuple((s, s + 8) for s in c) for c in itertools.product(*starts)]
    assert [p.box for p in result.patch_scores] == expected
    inside = np.zeros(vol.shape, dtype=bool)
    inside[2:18, 0:24, 3:29] = True
    assert not result.cam[~inside].any() and not result.score_map[~inside].any()
    scores = [p.score for p in result.patch_scores]
    # absolute scale: no voxel hotter than the best patch covering the box scored
    assert 0.0 <= result.cam.min() and result.cam.max() <= max(scores) + 1e-6
    assert result.max_score == max(scores)
    assert min(scores) - 1e-6 <= result.score_map[inside].min()
    assert result.score_map[inside].max() <= max(scores) + 1e-6


@pytest.mark.parametrize("blend, scale", [("score", "absolute"), ("score", "relative"), ("raw", "relative")])
def test_gaussian_blending_of_maps_and_scores(blend, scale):
    """Direct computation: each patch's map ("score": min-max scaled within the patch and
    multiplied by the patch's probability; "raw": as it is) and score, weighted by a separable
    Gaussian (sigma = p/8, peak 1, floor 1e-3), summed and divided by the summed weights; the
    absolute scale stops there, the relative one min-max scales the result."""
    net, vol = make_net(), make_volume((8, 8, 24))
    result = sliding_cam(net, vol, 8, 4, method="layercam", preprocess=window, batch_size=3, blend=blend, scale=scale)
    g = gaussian(8)
    weight = np.maximum(g[:, None, None] * g[None, :, None] * g[None, None, :], 1e-3)
    num, den = np.zeros((8, 8, 24)), np.zeros((8, 8, 24))
    score_num = np.zeros((8, 8, 24))
    for start in range(0, 17, 4):
        x = window(vol[:, :, start : start + 8])[None, None]
        raw = compute_cam(net, x, method="layercam", target=1, normalize=False)[0].double().numpy()
        p = float(torch.softmax(net(x).detach(), 1)[0, 1])
        if blend == "score":
            raw = p * (raw - raw.min()) / (raw.max() - raw.min())
        num[:, :, start : start + 8] += weight * raw
        score_num[:, :, start : start + 8] += weight * p
        den[:, :, start : start + 8] += weight
    expected = num / den
    if scale == "relative":
        expected = (expected - expected.min()) / (expected.max() - expected.min())
    assert np.allclose(result.cam, expected, atol=1e-5)
    assert np.allclose(result.score_map, score_num / den, atol=1e-6)
    assert len({round(p.score, 6) for p in result.patch_scores}) > 1, "scores must differ"


def test_numpy_and_integer_volumes():
    vol = make_volume((12, 12, 12)).round()
    expected = sliding_cam(make_net(), vol, 8, 4, preprocess=window).cam
    as_int16 = sliding_cam(make_net(), vol.numpy().astype(np.int16), 8, 4, preprocess=window).cam
    assert np.array_equal(as_int16, expected)
    flipped = vol.numpy()[::-1]  # a view with negative strides
    assert np.array_equal(
        sliding_cam(make_net(), flipped, 8, 4, preprocess=window).cam,
        sliding_cam(make_net(), flipped.copy(), 8, 4, preprocess=window).cam,
    )


def test_progress_and_cancellation():
    net, vol = make_net(), make_volume((12, 12, 12))
    calls = []
    sliding_cam(net, vol, 8, 4, batch_size=3, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(0, 8), (3, 8), (6, 8), (8, 8)]

    stop = threading.Event()
    with pytest.raises(CancelledError, match="after 3 of 8 patches"):
        sliding_cam(net, vol, 8, 4, batch_size=3, progress=lambda d, t: d and stop.set(), cancel=stop)
    with pytest.raises(CancelledError, match="after 0 of 8"):
        sliding_cam(net, vol, 8, 4, cancel=lambda: True)
    assert all(not m._forward_hooks for m in net.modules())


def test_out_of_memory_halves_the_batch(one_thread):
    vol = make_volume((12, 12, 16))
    seen = []

    def fault(x):
        seen.append(x.shape[0])
        if x.shape[0] > 2:
            raise oom()

    expected = sliding_cam(make_net(), vol, 8, 4, batch_size=2, preprocess=window)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # halving alone does not warn
        result = sliding_cam(Faulty(make_net(), fault), vol, 8, 4, batch_size=8, preprocess=window)
    assert seen[:3] == [8, 4, 2] and set(seen[2:]) == {2}
    assert result.batch_size == 2 and result.device == "cpu"
    assert np.array_equal(result.cam, expected.cam)
    assert np.array_equal(result.score_map, expected.score_map)


def test_out_of_memory_at_batch_one_falls_back_to_a_cpu_copy(one_thread):
    vol = make_volume((12, 12, 16))
    failures = [3]  # batch 4, 2 and 1 fail on the original model

    def fault(x):
        if failures[0] > 0:
            failures[0] -= 1
            raise oom()

    model = Faulty(make_net(), fault)
    params = [p.data_ptr() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="continuing on the CPU"):
        result = sliding_cam(model, vol, 8, 4, batch_size=4, preprocess=window)
    expected = sliding_cam(make_net(), vol, 8, 4, batch_size=1, preprocess=window)
    assert result.batch_size == 1 and result.device == "cpu"
    assert np.array_equal(result.cam, expected.cam)
    assert [p.data_ptr() for p in model.parameters()] == params  # the caller's model untouched
    assert all(not m._forward_hooks for m in model.modules())


def test_cpu_workers_share_each_batch_and_give_the_one_thread_result(one_thread):
    """With N intra-op threads the CPU path runs N single-threaded workers on copies of the model;
    the maps and scores are those of one thread, the caller's model and thread count untouched."""
    vol = make_volume((12, 16, 20))
    expected = sliding_cam(make_net(), vol, 8, 4, batch_size=6, preprocess=window)
    seen = []

    def fault(x):  # every worker's sub-batch; more than 2 patches "run out of memory"
        seen.append(x.shape[0])
        if x.shape[0] > 2:
            raise oom()

    model = Faulty(make_net(), fault)
    params = [p.data_ptr() for p in model.parameters()]
    torch.set_num_threads(2)
    result = sliding_cam(model, vol, 8, 4, batch_size=8, preprocess=window)
    assert torch.get_num_threads() == 2
    # 8 split in two (the second worker may not start once the first runs out of memory), then 4
    # split in two for every batch after that
    assert (
        seen[0] == 4
        and 2 in seen
        and set(seen) == {4, 2}
        and seen[seen.index(2) :] == [2] * (len(seen) - seen.index(2))
    )
    assert result.batch_size == 4 and result.device == "cpu"
    assert np.allclose(result.cam, expected.cam, atol=1e-6)
    assert np.allclose(result.score_map, expected.score_map, atol=1e-6)
    assert [p.box for p in result.patch_scores] == [p.box for p in expected.patch_scores]
    assert [p.data_ptr() for p in model.parameters()] == params
    assert all(not m._forward_hooks for m in model.modules())


def test_cpu_workers_only_where_a_batch_can_be_shared(one_thread):
    """One patch (a whole volume) or batches of one keep torch's own threads; batches of several
    patches go to single-threaded workers, one per torch thread."""

    class Threads(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.seen = net, []

        def forward(self, x):
            self.seen.append((x.shape[0], torch.get_num_threads()))
            return self.net(x)

    torch.set_num_threads(2)
    for patch, batch, expected in ((16, 4, {(1, 2)}), (8, 1, {(1, 2)}), (8, 4, {(2, 1)})):
        model = Threads(make_net())
        sliding_cam(model, make_volume((12, 12, 16)), patch, 4, batch_size=batch, preprocess=window)
        # the copies record on their own: the original saw its share of every batch
        assert set(model.seen) == expected, (patch, batch, model.seen)
        assert torch.get_num_threads() == 2


def test_out_of_memory_everywhere_raises_resource_error():
    def fault(x):
        raise oom()

    model = Faulty(make_net(), fault)
    with pytest.warns(RuntimeWarning), pytest.raises(ResourceError, match="one \\(8, 8, 8\\) patch"):
        sliding_cam(model, make_volume((8, 8, 8)), 8, 8, batch_size=2)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"patch": 0}, InvalidInputError, "patch must be"),
        ({"patch": (8, 8)}, InvalidInputError, "patch must be"),
        ({"stride": 9}, InvalidInputError, "larger than patch"),
        ({"roi": ((0, 4), (0, 4), (5, 4))}, InvalidInputError, "roi"),
        ({"roi": ((0, 4), (0, 4), (0, 40))}, InvalidInputError, "inside the volume"),
        ({"roi": "lungs"}, InvalidInputError, "roi must be"),
        ({"batch_size": 0}, InvalidInputError, "batch_size"),
        ({"device": "meta"}, InvalidInputError, "move the model"),
        ({"volume": torch.zeros(8, 8)}, InvalidInputError, "3-D"),
        ({"method": "gradcam+++"}, CamError, "unknown CAM method"),
        ({"layer": "head"}, CamError, "not a module"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"patch": 8, "stride": 4, "volume": make_volume((12, 12, 12))}
    args.update(kwargs)
    volume, patch, stride = args.pop("volume"), args.pop("patch"), args.pop("stride")
    with pytest.raises(error, match=match):
        sliding_cam(make_net(), volume, patch, stride, **args)


@pytest.mark.gpu
def test_real_cuda_out_of_memory_is_recovered():
    """On a GPU: cap this process's CUDA memory so a large batch cannot fit; the run halves the
    batch, finishes on the GPU, and matches the CPU result."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(1, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(2),
        nn.Flatten(),
        nn.Linear(512, 2),
    ).eval()
    vol = make_volume((64, 96, 96))
    expected = sliding_cam(net, vol, 48, 24, batch_size=2, preprocess=window)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    # about 1.5 GiB: one 48^3 patch needs ~0.1 GiB through this net, 64 patches need ~7 GiB
    torch.cuda.set_per_process_memory_fraction(1.5 * 2**30 / total)
    try:
        result = sliding_cam(net.cuda(), vol, 48, 24, batch_size=64, preprocess=window)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        net.cpu()
    assert result.device.startswith("cuda") and result.batch_size < 64
    assert np.allclose(result.cam, expected.cam, atol=1e-4)


def test_sigmoid_patch_scores_and_device_names():
    net, vol = make_net(), make_volume((8, 8, 8))
    result = sliding_cam(net, vol, 8, 8, preprocess=window, activation="sigmoid", device="cpu")
    logits = net(window(vol)[None, None]).detach()
    assert result.max_score == pytest.approx(float(torch.sigmoid(logits[0, 1])), abs=1e-6)
    assert result.patch_scores[0].probabilities == pytest.approx(tuple(torch.sigmoid(logits[0]).tolist()), abs=1e-6)


class Brightness(nn.Module):
    """P(nodule) rises with the mean brightness of a patch (logit = 100 x mean - ``bias``); its
    CAM layer ``act`` is high where the patch is bright."""

    def __init__(self, bias: float = 5.0) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 27)
            self.conv.bias.zero_()
        self.act = nn.ReLU()
        self.bias = bias

    def forward(self, x):
        m = self.act(self.conv(x)).mean((2, 3, 4))
        return torch.cat([-m, m], 1) * 100 - torch.tensor([-self.bias, self.bias])


def test_score_blend_silences_background_patches():
    """blend="score": a patch's map counts in proportion to its score, so a region only
    low-scoring patches cover stays cold, while "raw" blending keeps their (raw) heat."""
    vol = torch.zeros(8, 8, 32)
    vol[2:6, 2:6, 2:6] = 1.0  # a bright blob in the first patches
    vol[:, :, 24:] = 0.02  # a faint area only low-scoring patches see
    raw = sliding_cam(Brightness(), vol, 8, 8, layer="act", blend="raw", scale="relative")
    score = sliding_cam(Brightness(), vol, 8, 8, layer="act", blend="score")
    assert raw.cam[:, :, 26:30].max() > 0.01  # raw: the faint area keeps its heat
    assert score.cam[:, :, 26:30].max() < 0.01  # score-weighted: p(nodule) ~ 0.003 there
    assert score.cam[2:6, 2:6, 2:6].max() == pytest.approx(1.0, abs=1e-3)  # p(nodule) ~ 1 there
    with pytest.raises(InvalidInputError, match="blend"):
        sliding_cam(Brightness(), vol, 8, 8, layer="act", blend="max")
    with pytest.raises(InvalidInputError, match="no absolute scale"):
        sliding_cam(Brightness(), vol, 8, 8, layer="act", blend="raw")
    with pytest.raises(InvalidInputError, match="scale"):
        sliding_cam(Brightness(), vol, 8, 8, layer="act", scale="per-scan")


def test_absolute_scale_a_low_scoring_scan_has_no_hot_region():
    """A scan whose patches all score low: its heat map stays below the scores, so no voxel
    reaches 0.5 and segment_cam finds no region; the relative view would still reach 1."""
    import LungGradCAMLib as lgc

    vol = torch.zeros(8, 8, 32)
    vol[2:6, 2:6, 2:6] = 0.2  # a faint blob: P(nodule) about 0.1
    model = Brightness()
    absolute = sliding_cam(model, vol, 8, 4, layer="act")
    assert 0.0 < absolute.max_score < 0.5
    assert 0.0 < absolute.cam.max() <= absolute.max_score + 1e-6
    seg = lgc.segment_cam(lgc.Volume(absolute.cam, np.eye(4)), threshold=0.5, min_volume_mm3=0)
    assert seg.regions == [] and seg.peak == pytest.approx(float(absolute.cam.max()))
    relative = sliding_cam(model, vol, 8, 4, layer="act", scale="relative")
    assert relative.cam.max() == pytest.approx(1.0)
    assert lgc.segment_cam(lgc.Volume(relative.cam, np.eye(4)), threshold=0.5, min_volume_mm3=0).regions


def test_absolute_scale_same_patch_scores_give_the_same_map_values():
    """Two scans that share a blob (and so its patches' scores) give it the same heat, whatever
    else they hold: the second scan's far, brighter blob does not rescale the first one, as a
    per-scan (relative) scale does."""
    one = torch.zeros(8, 8, 48)
    one[2:5, 2:5, 2:5] = 1.0  # 27 voxels: P(nodule) about 0.57
    two = one.clone()
    two[2:6, 2:6, 34:38] = 1.0  # a brighter one three patches away: P(nodule) about 1
    model = Brightness()
    a, b = sliding_cam(model, one, 8, 8, layer="act"), sliding_cam(model, two, 8, 8, layer="act")
    shared = (slice(None), slice(None), slice(0, 24))  # patches that see the first blob only
    assert [p.score for p in a.patch_scores][:3] == [p.score for p in b.patch_scores][:3]
    assert np.array_equal(a.cam[shared], b.cam[shared])
    assert a.cam.max() == pytest.approx(a.max_score, abs=1e-3) and 0.5 < a.max_score < 0.7
    ra, rb = (sliding_cam(model, v, 8, 8, layer="act", scale="relative") for v in (one, two))
    assert ra.cam[shared].max() == pytest.approx(1.0)
    assert rb.cam[shared].max() < 0.7
