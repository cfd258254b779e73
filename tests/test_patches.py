"""Batched patch augmentation: parameter statistics, each op against torchvision, end-to-end properties."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torch.utils._python_dispatch import TorchDispatchMode

from empssl import patches as pm
from empssl.patches import Augment, AugmentError, PatchParams, apply_params, make_patches, sample_params

# Every random op off, full-image crop: the pipeline should reduce to resize + normalise.
IDENTITY = Augment(scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
NO_COLOR = {"flip_p": 0.0, "jitter_p": 0.0, "gray_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 4, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=gen(seed))


def normalised(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255 * 2 - 1


# --- parameters ------------------------------------------------------------------------------------------


def test_param_rates_match_probabilities() -> None:
    p = sample_params(200, 100, Augment(), gen(), "cpu", image_hw=(32, 32))  # 20 000 patches
    tol = 4 * math.sqrt(0.25 / 20_000)  # 4 sigma of a Bernoulli mean
    assert abs(p.flip.float().mean() - 0.5) < tol
    assert abs(p.jitter.float().mean() - 0.8) < tol
    assert abs(p.gray.float().mean() - 0.2) < tol
    assert abs(p.blur.float().mean() - 0.1) < tol
    assert abs(p.solarize.float().mean() - 0.1) < tol
    assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0
    for col, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.2, 0.2)]):
        f = p.factors[:, col]
        assert f.min() >= lo and f.max() <= hi
        assert abs(f.mean() - (lo + hi) / 2) < 0.01
    # Each row of `order` is a permutation, and every op is equally likely in every slot.
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(20_000, 4))
    slot_freq = F.one_hot(p.order, 4).float().mean(0)  # (slot, op)
    assert torch.allclose(slot_freq, torch.full((4, 4), 0.25), atol=0.02)


def test_official_crop_is_a_quarter_of_the_image() -> None:
    p = sample_params(20, 100, Augment(), gen(), "cpu", image_hw=(32, 32))
    left, top, w, h = p.crop.unbind(1)
    assert p.crop.dtype == torch.long
    assert torch.equal(w, torch.full_like(w, 16)) and torch.equal(h, torch.full_like(h, 16))
    # Offsets uniform over the 17 whole-pixel positions 0 .. 16, as torch.randint(0, 17) draws them.
    for offset in (left, top):
        assert offset.min() == 0 and offset.max() == 16
        assert abs(offset.float().mean() - 8) < 0.25
        assert torch.bincount(offset, minlength=17).min() > 2000 / 17 / 2


def torchvision_boxes(n: int, hw: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float]
                      ) -> torch.Tensor:
    """(n, 4) boxes (left, top, width, height) from ``n`` calls of torchvision's RandomResizedCrop.get_params."""
    torch.manual_seed(0)
    img = torch.empty(3, *hw)
    boxes = (T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n))
    return torch.tensor([(j, i, w, h) for i, j, h, w in boxes])


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.2, 1.0), (0.25, 0.25)])
@pytest.mark.parametrize("hw", [(32, 32), (48, 64)])
def test_crop_distribution_equals_torchvision_get_params(scale: tuple[float, float], hw: tuple[int, int]) -> None:
    """100,000 boxes each, ratio (3/4, 4/3): mean and quantiles of the area, width and left offset.

    The tolerances are ~4 standard errors of a difference of two 100,000-draw means; accepting a width before
    rounding it (the old rule) made the mean area 2.5 % smaller for scale (0.08, 1), ~0.012, far outside them.
    """
    n, ratio = 100_000, (3 / 4, 4 / 3)
    ours = sample_params(1000, 100, Augment(scale=scale, ratio=ratio), gen(), "cpu", image_hw=hw).crop
    ref = torchvision_boxes(n, hw, scale, ratio)
    H, W = hw
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    for name, a, b, tol in [
        ("area", ours[:, 2] * ours[:, 3] / (H * W), ref[:, 2] * ref[:, 3] / (H * W), 0.005),
        ("width", ours[:, 2].double(), ref[:, 2].double(), 0.12),
        ("left", ours[:, 0].double(), ref[:, 0].double(), 0.12),
    ]:
        a, b = a.double(), b.double()
        assert abs(a.mean() - b.mean()) < tol, name
        # Quantiles of whole-pixel values move in steps: within one pixel (width, left) or 0.02 of the area.
        assert (a.quantile(q) - b.quantile(q)).abs().max() <= (0.02 if name == "area" else 1.0), name
    assert ((ours[:, 0] + ours[:, 2]) <= W).all() and ((ours[:, 1] + ours[:, 3]) <= H).all()


def test_crop_fallback_is_the_centred_crop() -> None:
    # A full-area square crop cannot fit a 48 x 64 image: torchvision falls back to the centred 48 x 48.
    p = sample_params(2, 3, Augment(scale=(1.0, 1.0)), gen(), "cpu", image_hw=(48, 64))
    assert torch.equal(p.crop, torch.tensor([8, 0, 48, 48]).expand(6, 4))
    img = torch.empty(3, 48, 64)
    assert T.RandomResizedCrop.get_params(img, [1.0, 1.0], [1.0, 1.0]) == (0, 8, 48, 48)


# --- each op against torchvision.transforms.v2.functional ---------------------------------------------


def rgb(n: int = 3, size: int = 16) -> torch.Tensor:
    x = torch.rand(n, 3, size, size, generator=gen(1))
    x[0, :, :4] = x[0, :1, :4]  # gray pixels (zero chroma) are a special case for hue
    x[1, :, :2] = 1.0  # saturated pixels
    return x


@pytest.mark.parametrize("hue", [-0.2, -0.05, 0.0, 0.13, 0.2, 0.5])
def test_hue_matches_torchvision(hue: float) -> None:
    x = rgb()
    ours = pm._adjust_hue(x, torch.full((3,), hue))
    torch.testing.assert_close(ours, TF.adjust_hue(x, hue), atol=1e-5, rtol=0)


@pytest.mark.parametrize("factor", [0.6, 0.93, 1.4])
def test_brightness_contrast_saturation_match_torchvision(factor: float) -> None:
    x = rgb()
    for op, ref in enumerate([TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]):
        ours = pm._blend_(x.clone(), torch.full((3, 1, 1, 1), op), torch.full((3, 1, 1, 1), factor))
        torch.testing.assert_close(ours, ref(x, factor), atol=1e-5, rtol=0)


def test_jitter_follows_each_patchs_own_order() -> None:
    """Every one of the 24 orders, per patch in one batch, against torchvision applied in that order."""
    import itertools

    orders = torch.tensor(list(itertools.permutations(range(4))))  # (24, 4)
    n = len(orders)
    x = torch.rand(n, 3, 8, 8, generator=gen(2))
    factors = torch.tensor([1.35, 0.65, 1.3, 0.17]).expand(n, 4).clone()
    factors[::2] = torch.tensor([0.7, 1.38, 0.62, -0.19])
    jitter = torch.ones(n, dtype=torch.bool)
    jitter[5] = False  # not jittered: unchanged
    params = _params(n, jitter=jitter, factors=factors, order=orders)
    ours = pm._color_jitter(x.clone(), params, Augment())
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(n):
        ref = x[i]
        if jitter[i]:
            for op in orders[i].tolist():
                ref = fns[op](ref, factors[i, op].item())
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0, msg=f"order {orders[i].tolist()}")


def test_blur_matches_torchvision() -> None:
    x = torch.rand(3, 3, 32, 32, generator=gen(3))
    sigma = torch.tensor([0.1, 0.9, 2.0])
    ours = pm._gaussian_blur(x, sigma, 2.0)
    for i, s in enumerate(sigma.tolist()):
        ref = TF.gaussian_blur(x[i], kernel_size=[13, 13], sigma=[s, s])
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0)


def _params(n: int, **kw: torch.Tensor) -> PatchParams:
    """Parameters of n patches with every op off (full-image crop), overridden by kw."""
    off = torch.zeros(n, dtype=torch.bool)
    base = {
        "crop": torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(n, 4),
        "flip": off,
        "jitter": off,
        "factors": torch.tensor([1.0, 1.0, 1.0, 0.0]).expand(n, 4),
        "order": torch.arange(4).expand(n, 4),
        "gray": off,
        "blur": off,
        "sigma": torch.ones(n),
        "solarize": off,
    }
    base.update(kw)
    return PatchParams(**base)


# --- the whole pipeline -----------------------------------------------------------------------------------


def test_output_shape_dtype_and_range() -> None:
    imgs = images(5)
    out = make_patches(imgs, 7, Augment(), gen())
    assert out.shape == (7, 5, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1 and torch.isfinite(out).all()
    bf = make_patches(imgs, 7, Augment(), gen(), out_dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float(), out, atol=1e-2, rtol=0)


def test_same_seed_same_patches_and_different_seeds_differ() -> None:
    imgs = images(4)
    a = make_patches(imgs, 6, Augment(), gen(7))
    b = make_patches(imgs, 6, Augment(), gen(7))
    c = make_patches(imgs, 6, Augment(), gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])  # the patches of one image differ from each other


def test_identity_config_reproduces_the_normalised_image() -> None:
    imgs = images(3)
    out = make_patches(imgs, 4, IDENTITY, gen())
    torch.testing.assert_close(out, normalised(imgs).expand(4, -1, -1, -1, -1), atol=1e-6, rtol=0)


def test_float_input_equals_uint8_input() -> None:
    imgs = images(3)
    a = make_patches(imgs, 4, Augment(), gen())
    b = make_patches(imgs.float() / 255, 4, Augment(), gen())
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


CROP_CASES = [  # (image height, width, patch size, scale, ratio)
    (32, 32, 32, (0.25, 0.25), (1.0, 1.0)),  # the official CIFAR recipe: 16 px crops upsampled to 32
    (32, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3)),  # the baselines on CIFAR: non-square crops, some full-size
    (64, 64, 32, (0.08, 1.0), (3 / 4, 4 / 3)),  # baselines on 64 px images: up- and downsampled crops
    (48, 64, 24, (0.2, 1.0), (0.5, 2.0)),  # non-square images, downsampled
    (20, 30, 16, (0.05, 0.6), (0.3, 3.0)),  # small odd sizes, strongly non-square boxes
    # an image narrower than the ratios allow: the fallback box (14 x 19) is taller than any accepted attempt and
    # than the patch, so it must take the antialiased path
    (20, 14, 18, (0.85, 0.9), (3 / 4, 3.0)),
]


@pytest.mark.parametrize("case", CROP_CASES)
def test_crop_and_flip_equal_torchvision_resized_crop(case: tuple) -> None:
    """Every patch, whole, equals hflip(resized_crop(image, top, left, h, w, size, antialias=True)) of its
    own box to 1e-5: up- and downsampled, square and non-square boxes and images."""
    H, W, size, scale, ratio = case
    n, b = 8, 5
    aug = Augment(size=size, scale=scale, ratio=ratio, flip_p=0.5, mean=(0.0,) * 3, std=(1.0,) * 3, **{
        k: v for k, v in NO_COLOR.items() if k != "flip_p"})
    x = torch.rand(b, 3, H, W, generator=gen(3))
    params = sample_params(n, b, aug, gen(5), "cpu", image_hw=(H, W))
    out = apply_params(x, params, aug, n).flatten(0, 1)
    ref = []
    for q, (left, top, w, h) in enumerate(params.crop.tolist()):
        patch = TF.resized_crop(x[q % b], top, left, h, w, [size, size], antialias=True)
        ref.append(TF.hflip(patch) if params.flip[q] else patch)
    torch.testing.assert_close(out, torch.stack(ref), atol=1e-5, rtol=0)
    assert 0 < params.flip.sum() < n * b
    sides = params.crop[:, 2:]
    if H > size:  # the case exercises downsampling (and, with these scales, upsampling too)
        assert (sides > size).any() and (sides < size).any()


def test_both_resize_paths_agree_when_no_crop_is_downsampled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The grid_sample path (no crop larger than the patch) and the antialiased-weights path give the same
    patches where both apply."""
    aug = Augment(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    imgs = images(6)
    fast = make_patches(imgs, 5, aug, gen(2))
    monkeypatch.setattr(pm, "_max_crop_side", lambda *a: 10**6)
    torch.testing.assert_close(make_patches(imgs, 5, aug, gen(2)), fast, atol=1e-5, rtol=0)


def test_non_square_and_larger_images() -> None:
    imgs = images(3, h=48, w=64)
    out = make_patches(imgs, 5, Augment(), gen())
    assert out.shape == (5, 3, 3, 32, 32) and out.min() >= -1 and out.max() <= 1
    # A full-image crop with the image's own aspect is the image resized (antialiased) to 32 x 32.
    smooth = torch.rand(1, 3, 48, 64, generator=gen(4))
    full = make_patches(smooth, 2, dataclasses.replace(IDENTITY, ratio=(4 / 3, 4 / 3)), gen())
    ref = F.interpolate(smooth, size=(32, 32), mode="bilinear", antialias=True) * 2 - 1
    torch.testing.assert_close(full, ref.expand(2, -1, -1, -1, -1), atol=1e-5, rtol=0)


def test_downscaled_full_crop_is_the_antialiased_resize() -> None:
    """64 -> 32: a full-image crop is torchvision's antialiased resize (a triangle filter 2 px wide each
    way), not a 2 x 2 box average."""
    imgs = images(2, h=64, w=64)
    out = make_patches(imgs, 3, IDENTITY, gen())
    ref = TF.resize(imgs.float() / 255, [32, 32], antialias=True) * 2 - 1
    torch.testing.assert_close(out, ref.expand(3, -1, -1, -1, -1), atol=1e-5, rtol=0)
    assert (out[0] - (F.avg_pool2d(imgs.float() / 255, 2) * 2 - 1)).abs().max() > 0.05


def test_flip_gray_solarize_blur_show_in_the_output() -> None:
    n, b = 50, 20
    imgs = images(b)
    x = normalised(imgs).expand(n, -1, -1, -1, -1)
    aug = dataclasses.replace(IDENTITY, flip_p=0.5, gray_p=0.2, solarize_p=0.3, blur_p=0.3)
    params = sample_params(n, b, aug, gen(), "cpu", image_hw=(32, 32))
    out = apply_params(imgs, params, aug, n)
    flip, gray, sol, blur = (m.view(n, b) for m in (params.flip, params.gray, params.solarize, params.blur))
    plain = ~(gray | sol | blur)
    assert plain.sum() > 100
    assert torch.equal(out[plain & ~flip], x[plain & ~flip])
    assert torch.equal(out[plain & flip], x[plain & flip].flip(-1))
    channels_equal = ((out[:, :, 0] == out[:, :, 1]) & (out[:, :, 1] == out[:, :, 2])).flatten(2).all(-1)
    assert torch.equal(channels_equal, gray)
    only_sol = sol & ~gray & ~blur & ~flip
    xs = x[only_sol]
    torch.testing.assert_close(out[only_sol], torch.where(xs >= 0, -xs, xs))  # 1 - v, normalised: -x
    only_blur = blur & ~gray & ~sol
    assert only_blur.sum() > 10
    assert not torch.isclose(out[only_blur], x[only_blur]).all()
    # Blur lowers the high-frequency energy of a noise image.
    assert out[only_blur].diff(dim=-1).abs().mean() < 0.8 * x[only_blur].diff(dim=-1).abs().mean()


def test_brightness_only_scales_each_patch_by_its_factor() -> None:
    n, b = 20, 10
    imgs = images(b)
    aug = dataclasses.replace(IDENTITY, jitter_p=1.0, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0)
    params = sample_params(n, b, aug, gen(), "cpu", image_hw=(32, 32))
    out = apply_params(imgs, params, aug, n)
    f = params.factors[:, 0].view(n, b, 1, 1, 1)
    ref = (imgs.float() / 255 * f).clamp(0, 1) * 2 - 1
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # Mean brightness change over many patches: E[f] = 1, spread 0.4 / sqrt(3).
    many = sample_params(200, 100, aug, gen(1), "cpu", image_hw=(32, 32)).factors
    assert abs(many[:, 0].mean() - 1) < 0.01 and abs(many[:, 0].std() - 0.4 / math.sqrt(3)) < 0.01
    assert torch.equal(many[:, 1:3], torch.ones(20_000, 2)) and torch.equal(many[:, 3], torch.zeros(20_000))


def test_output_rates_over_many_patches() -> None:
    imgs = images(100)
    aug = dataclasses.replace(Augment(), jitter_p=0.0, blur_p=0.0, solarize_p=0.0)
    out = make_patches(imgs, 20, aug, gen())  # 2000 patches
    gray = ((out[:, :, 0] == out[:, :, 1]) & (out[:, :, 1] == out[:, :, 2])).flatten(2).all(-1)
    assert abs(gray.float().mean() - 0.2) < 4 * math.sqrt(0.16 / 2000)


def test_chunked_cpu_path_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    imgs = images(6)
    whole = make_patches(imgs, 5, Augment(), gen())
    monkeypatch.setattr(pm, "_CPU_CHUNK_ELEMENTS", 7 * 3 * 32 * 32)  # chunks of 7 patches, ragged end
    chunked = make_patches(imgs, 5, Augment(), gen())
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


class PatchPasses(TorchDispatchMode):
    """Records every op, and as passes the ops that write (k, 3, 32, 32) patch tensors (allocations and views
    are not passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.passes: list[tuple[str, int]] = []
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.__name__)
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.shape[-3:] == (3, 32, 32) and not func.is_view \
                    and not func.__name__.startswith("empty"):
                self.passes.append((func.__name__, t.numel()))
        return out


def bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor, laid out contiguously."""
    return x.contiguous().view(torch.int32 if x.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("chunked", [False, True])
def test_dtype_and_memory_format_keep_the_values_and_add_no_pass(
    dtype: torch.dtype, memory_format: torch.memory_format, chunked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunked:
        monkeypatch.setattr(pm, "_CPU_CHUNK_ELEMENTS", 7 * 3 * 32 * 32)  # chunks of 7 patches, ragged end
    else:
        monkeypatch.setattr(pm, "_CPU_CHUNK_ELEMENTS", 1 << 40)  # one chunk, as on a GPU
    imgs, n = images(6, h=40, w=36), 5
    aug = dataclasses.replace(Augment(), blur_p=0.5, solarize_p=0.5)
    with PatchPasses() as plain:
        ref = make_patches(imgs, n, aug, gen(3))  # float32, contiguous
    with PatchPasses() as mode:
        out = make_patches(imgs, n, aug, gen(3), out_dtype=dtype, memory_format=memory_format)
    assert out.shape == (n, 6, 3, 32, 32) and out.dtype == dtype
    flat = out.flatten(0, 1)
    assert flat.is_contiguous(memory_format=memory_format)
    assert flat.contiguous(memory_format=memory_format).data_ptr() == flat.data_ptr()  # a caller's copy is free
    assert torch.equal(bits(flat), bits(ref.flatten(0, 1).to(dtype)))  # bit for bit the float32 values, cast
    # The cast and the layout ride on the normalisation: the same passes over the patches as float32.
    assert mode.passes == plain.passes and ("div.out", 7 * 3 * 32 * 32 if chunked else out.numel()) in plain.passes


def test_no_host_synchronisation() -> None:
    """.item(), bool(tensor) and .tolist() on a GPU tensor wait for the GPU; none of them runs here."""
    with PatchPasses() as mode:
        make_patches(images(4), 3, dataclasses.replace(Augment(), blur_p=0.5), gen(), memory_format=torch.channels_last)
    assert not {"_local_scalar_dense.default", "is_nonzero.default", "equal.default"} & set(mode.ops)


def test_bad_memory_format_raises() -> None:
    with pytest.raises(AugmentError, match="memory_format"):
        make_patches(images(2), 2, Augment(), gen(), memory_format=torch.preserve_format)


def test_autocast_does_not_change_the_result() -> None:
    imgs = images(3)
    ref = make_patches(imgs, 4, Augment(), gen())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = make_patches(imgs, 4, Augment(), gen())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kw",
    [
        {"scale": (0.5, 0.25)},
        {"scale": (0.0, 0.5)},
        {"ratio": (2.0, 1.0)},
        {"flip_p": 1.5},
        {"hue": 0.7},
        {"brightness": -0.1},
        {"blur_sigma": (0.0, 1.0)},
        {"size": 0},
        {"std": (0.5, 0.0, 0.5)},
    ],
)
def test_invalid_settings_raise(kw: dict) -> None:
    with pytest.raises(AugmentError):
        Augment(**kw)


def test_list_settings_become_tuples() -> None:
    aug = Augment(scale=[0.25, 0.25], mean=[0.5, 0.5, 0.5])  # type: ignore[arg-type]  # as read from JSON
    assert aug == Augment() and hash(aug) == hash(Augment())
    with pytest.raises(AugmentError, match="scale needs 2"):
        Augment(scale=(0.25,))  # type: ignore[arg-type]


def test_bad_inputs_raise() -> None:
    with pytest.raises(AugmentError, match="shape"):
        make_patches(torch.zeros(2, 1, 32, 32), 2, Augment(), gen())
    with pytest.raises(AugmentError, match="patches"):
        apply_params(images(2), sample_params(3, 2, Augment(), gen(), "cpu", image_hw=(32, 32)), Augment(), n_patches=2)


class _SameImage(torch.utils.data.Dataset):
    """One image, n times, through a transform."""

    def __init__(self, transform: pm.MultiPatch, n: int) -> None:
        self.transform, self.image, self.n = transform, images(1)[0], n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.image)


def test_multi_patch_transform_is_make_patches() -> None:
    aug = Augment(size=16)
    batch = images(3)
    want = make_patches(batch, 4, aug, gen(5))  # (4, 3, 3, 16, 16)
    assert torch.equal(pm.MultiPatch(4, aug, gen(5))(batch), want)
    assert torch.equal(pm.MultiPatch(4, aug, gen(5))(batch[0]), make_patches(batch[:1], 4, aug, gen(5))[:, 0])
    # without a generator: a new draw per call, reproducible from torch's global seed
    t = pm.MultiPatch(4, aug)
    torch.manual_seed(0)
    first, second = t(batch[0]), t(batch[0])
    torch.manual_seed(0)
    assert first.shape == (4, 3, 16, 16) and not torch.equal(first, second) and torch.equal(t(batch[0]), first)
    with pytest.raises(TypeError, match="torch.Tensor"):
        t([batch[0]])


def test_multi_patch_in_dataloader_workers_cuts_different_patches() -> None:
    loader = torch.utils.data.DataLoader(_SameImage(pm.MultiPatch(2, Augment(size=8)), 8), batch_size=2,
                                         num_workers=2)
    cut = torch.cat(list(loader))  # (8, 2, 3, 8, 8): the same image eight times, in two workers
    assert cut.shape == (8, 2, 3, 8, 8)
    assert len({tuple(c.flatten().tolist()) for c in cut}) == 8  # no two items alike, across workers too
