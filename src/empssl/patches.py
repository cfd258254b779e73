"""Many augmented patches per image, made at once with batched tensor ops on the training device.

The official EMP-SSL code runs a torchvision/PIL pipeline once per patch on the CPU. Here the random parameters
of all P = n_patches * B patches are drawn as tensors from a ``torch.Generator`` (:func:`sample_params`), then
applied by batched ops (:func:`apply_params`): no per-patch loop, no PIL, no host sync. In the official order:
RandomResizedCrop + RandomHorizontalFlip (torchvision's boxes and antialiased resize), ColorJitter with
probability ``jitter_p`` in a random order per patch (v2's float semantics: clamp to [0, 1] after each op),
RandomGrayscale, Gaussian blur (per-patch sigma), Solarize, Normalize.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# torchvision's RandomResizedCrop tries this many (scale, ratio) draws before falling back to a centre crop.
_CROP_ATTEMPTS = 10
# Float32 elements per chunk of the pixel ops on CPU (4 MiB, ~340 patches of 32 px): measured fastest,
# ~1.5x faster than whole-batch passes (whose fresh temporaries cost page faults); smaller ones pay overhead.
_CPU_CHUNK_ELEMENTS = 1 << 20


class AugmentError(ValueError):
    """An invalid augmentation setting or input (reported in one line)."""


@dataclass(frozen=True)
class Augment:
    """The per-patch augmentation recipe; the defaults are the official EMP-SSL CIFAR pipeline."""

    size: int = 32  # output patch side in pixels
    scale: tuple[float, float] = (0.25, 0.25)  # crop area as a fraction of the image area
    ratio: tuple[float, float] = (1.0, 1.0)  # crop aspect (width / height, in pixels), log-uniform
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.2
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.1
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        # Configs read back from JSON hold lists; store tuples so the recipe stays hashable and comparable.
        for name, length in (("scale", 2), ("ratio", 2), ("blur_sigma", 2), ("mean", 3), ("std", 3)):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != length:
                raise AugmentError(f"{name} needs {length} values, got {getattr(self, name)}")
            object.__setattr__(self, name, value)
        if self.size < 1:
            raise AugmentError(f"patch size must be >= 1, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise AugmentError(f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise AugmentError(f"crop ratio must satisfy 0 < min <= max, got {tuple(self.ratio)}")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise AugmentError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise AugmentError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise AugmentError(f"hue must be in [0, 0.5], got {self.hue}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise AugmentError(f"blur sigma must satisfy 0 < min <= max, got {tuple(self.blur_sigma)}")
        if any(s <= 0 for s in self.std):
            raise AugmentError(f"std must be > 0, got {self.std}")

    @classmethod
    def from_config(cls, cfg: Any) -> Augment:
        """The config's patch size, crop scale and ratio; the official colour augmentations."""
        return cls(size=cfg.patch_size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio))


@dataclass
class PatchParams:
    """Random parameters of P = n_patches * B patches, index p = patch p // B of image p % B: the output
    (n_patches, B, 3, s, s) flattened over its first two dims is the official concatenation order."""

    crop: torch.Tensor  # (P, 4) long: left, top, width, height of the crop box in pixels of the image
    flip: torch.Tensor  # (P,) bool: mirror horizontally
    jitter: torch.Tensor  # (P,) bool: apply the colour jitter
    factors: torch.Tensor  # (P, 4) float: brightness, contrast, saturation factors and hue shift
    order: torch.Tensor  # (P, 4) long: order[p, k] = jitter op applied k-th (0 bright, 1 contr, 2 sat, 3 hue)
    gray: torch.Tensor  # (P,) bool
    blur: torch.Tensor  # (P,) bool
    sigma: torch.Tensor  # (P,) float: blur sigma in output pixels (used where ``blur``)
    solarize: torch.Tensor  # (P,) bool


def _crop_boxes(P: int, aug: Augment, image_hw: tuple[int, int], uniform: Callable[..., torch.Tensor]) -> torch.Tensor:
    """(P, 4) long crop boxes (left, top, width, height) in pixels, as torchvision's
    ``RandomResizedCrop.get_params`` draws them: its 10 attempts drawn at once and the first accepted one taken
    (the same distribution, no loop); none accepted: the centred fallback box."""
    height, width = image_hw
    if height < 1 or width < 1:
        raise AugmentError(f"image height and width must be >= 1, got {image_hw}")
    scale = uniform(aug.scale[0], aug.scale[1], _CROP_ATTEMPTS, P)
    aspect = torch.exp(uniform(math.log(aug.ratio[0]), math.log(aug.ratio[1]), _CROP_ATTEMPTS, P))
    # torchvision multiplies and takes the roots in float64 (Python floats); MPS has no float64.
    wide = torch.float64 if scale.device.type != "mps" else torch.float32
    area, aspect = scale.to(wide) * (height * width), aspect.to(wide)
    w = torch.sqrt(area * aspect).round_()
    h = torch.sqrt(area / aspect).round_()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.to(torch.uint8).argmax(0, keepdim=True)  # first accepted attempt (0 if none)
    w, h = w.gather(0, first)[0].long(), h.gather(0, first)[0].long()
    fb_w, fb_h = _fallback_box(aug, height, width)
    any_valid = valid.any(0)
    w = torch.where(any_valid, w, fb_w)
    h = torch.where(any_valid, h, fb_h)
    # Offsets uniform over the whole pixels that keep the box inside (torch.randint's range), centred otherwise.
    u = uniform(0, 1, 2, P)
    left = torch.minimum((u[0] * (width - w + 1)).long(), width - w)
    top = torch.minimum((u[1] * (height - h + 1)).long(), height - h)
    left = torch.where(any_valid, left, (width - fb_w) // 2)
    top = torch.where(any_valid, top, (height - fb_h) // 2)
    return torch.stack([left, top, w, h], dim=1)


def _fallback_box(aug: Augment, height: int, width: int) -> tuple[int, int]:
    """(width, height) of torchvision's crop where no attempt is accepted: the whole image, its aspect clamped to
    ``ratio``."""
    return min(width, round(height * aug.ratio[1])), min(height, round(width / aug.ratio[0]))


def sample_params(n_patches: int, batch: int, aug: Augment, generator: torch.Generator, device: torch.device | str,
                  image_hw: tuple[int, int]) -> PatchParams:
    """Draw the parameters of ``n_patches * batch`` patches from ``generator`` (on ``device``) for images of
    ``image_hw`` = (height, width) pixels."""
    if n_patches < 1 or batch < 1:
        raise AugmentError(f"n_patches and batch must be >= 1, got {n_patches} and {batch}")
    P = n_patches * batch
    device = torch.device(device)

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:  # torch.rand is uniform(0, 1)
        return torch.empty(*shape, device=device).uniform_(lo, hi, generator=generator)

    crop = _crop_boxes(P, aug, image_hw, uniform)
    strengths = (aug.brightness, aug.contrast, aug.saturation)
    factors = [uniform(max(0.0, 1 - v), 1 + v, P) for v in strengths] + [uniform(-aug.hue, aug.hue, P)]
    return PatchParams(
        crop=crop,
        flip=uniform(0, 1, P) < aug.flip_p,
        jitter=uniform(0, 1, P) < aug.jitter_p,
        factors=torch.stack(factors, dim=1),
        order=uniform(0, 1, P, 4).argsort(dim=1),  # a uniform random permutation per patch
        gray=uniform(0, 1, P) < aug.gray_p,
        blur=uniform(0, 1, P) < aug.blur_p,
        sigma=uniform(aug.blur_sigma[0], aug.blur_sigma[1], P),
        solarize=uniform(0, 1, P) < aug.solarize_p,
    )


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """(P, 3, h, w) RGB -> (P, 1, h, w) luma, with torchvision's (ITU-R 601-2) weights and op order."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _blend_(x: torch.Tensor, op: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """x <- clamp(f x + (1 - f) ref, 0, 1) in place: torchvision's ``_blend`` for brightness (op 0, ref = 0),
    contrast (1, the patch's mean luma) or saturation (2, the pixel's luma). x: (P, 3, h, w); op, f: (P, 1, 1, 1).
    Factor 1 leaves a patch bit-exactly unchanged: how patches that skip a slot are masked."""
    gray = _grayscale(x)  # (P, 1, h, w)
    mean = gray.mean(dim=(-2, -1), keepdim=True)  # (P, 1, 1, 1)
    a, c = torch.where(op == 2, 1 - f, 0.0), torch.where(op == 1, 1 - f, 0.0)  # (1 - f) ref = a luma + c mean
    # Two multiply-adds (one pass over x instead of two) and the clamp, all in place.
    ref = torch.addcmul(c * mean, gray, a, out=gray)
    return torch.addcmul(ref, x, f, out=x).clamp_(0, 1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of each patch by ``shift`` (P,) turns, as torchvision.v2's adjust_hue does.

    The hue is torchvision's formula; the way back is the closed form c = V - V S clamp(min(k, 4 - k), 0, 1),
    k = (n + 6 H) mod 6, n = 5, 3, 1 for R, G, B, i.e. c = min + (max - min) clamp(|k - 2| - 1, 0, 1): the values
    of torchvision's table lookup without its gather.
    """
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)  # (P, h, w); faster than aminmax on CPU
    chroma = maxc - minc
    div = torch.where(chroma == 0, 1.0, chroma)
    rc, gc, bc = (maxc - r).div_(div), (maxc - g).div_(div), (maxc - b).div_(div)
    h_r = bc - gc
    h_g = bc.neg_().add_(2.0).add_(rc)  # 2 + rc - bc
    h_b = gc.add_(4.0).sub_(rc)  # 4 + gc - rc
    h = torch.where(maxc == r, h_r, torch.where(maxc == g, h_g, h_b))
    h = h.mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)  # torchvision's hue, in [0, 1)
    h = h.add_(shift.view(-1, 1, 1)).remainder_(1.0).mul_(6.0).unsqueeze(1)  # (P, 1, h, w), in [0, 6)
    n = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (h + n).remainder_(6.0)  # (P, 3, h, w)
    k = k.sub_(2.0).abs_().sub_(1.0).clamp_(0, 1)
    return torch.addcmul(minc.unsqueeze(1), k, chroma.unsqueeze(1), out=k)


def _color_jitter(x: torch.Tensor, params: PatchParams, aug: Augment) -> torch.Tensor:
    """ColorJitter with a per-patch random order, applied where ``params.jitter``. x: (P, 3, h, w). The costly hue
    runs once for all patches, between the slots before and after each patch's hue slot: 3 + 1 + 3 passes."""
    jit, order, factors = params.jitter, params.order, params.factors
    hue_slot = order.argsort(dim=1)[:, 3:]  # (P, 1) position of the hue op in each patch's order
    ops = torch.cat([order[:, :3], order[:, 1:]], dim=1)  # (P, 6): slots 0, 1, 2 before hue, 1, 2, 3 after
    pos = torch.arange(4, device=x.device)
    active = torch.cat([pos[:3] < hue_slot, pos[1:] > hue_slot], dim=1) & jit.unsqueeze(1) & (ops != 3)
    f = torch.where(active, factors.gather(1, ops.clamp(max=2)), 1.0)
    for k in range(6):
        if k == 3 and aug.hue > 0:
            x = torch.where(jit.view(-1, 1, 1, 1), _adjust_hue(x, factors[:, 3]), x, out=x)
        x = _blend_(x, ops[:, k].view(-1, 1, 1, 1), f[:, k].view(-1, 1, 1, 1))
    return x


@functools.lru_cache(maxsize=16)
def _blur_basis(s: int, radius: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """-t^2 for the blur's taps t (k,), and onehot (k, s * s): onehot[t, i * s + j] = 1 where tap t of output
    pixel i reads input pixel j (reflected at the borders)."""
    with torch.inference_mode(False):  # plain tensors even if first made under inference mode
        taps = torch.arange(-radius, radius + 1, device=device)  # (k,)
        i = torch.arange(s, device=device)
        src = i.view(1, -1) + taps.view(-1, 1)  # (k, s)
        src = torch.where(src < 0, -src, src)
        src = torch.where(src > s - 1, 2 * (s - 1) - src, src)
        onehot = (src.unsqueeze(-1) == i).float().view(len(taps), s * s)
        return -(taps.float() ** 2), onehot


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Separable Gaussian blur with a per-patch sigma and reflect padding, radius ceil(3 sigma_max) clipped to the
    patch. x: (P, 3, s, s); sigma: (P,). M @ x @ M^T with M each patch's banded (s, s) 1-D blur: two batched
    matmuls, several times faster on CPU than a grouped convolution."""
    s = x.shape[-1]
    neg_sq_taps, onehot = _blur_basis(s, min(math.ceil(3 * sigma_max), (s - 1) // 2), x.device)
    w = torch.exp(neg_sq_taps / (2 * sigma.view(-1, 1) ** 2))
    w = w / w.sum(dim=1, keepdim=True)  # (P, k)
    m = (w @ onehot).view(-1, s, s)  # (P, s, s)
    P = x.shape[0]
    # Rows first through a (P, 3s, s) view (no copy), then columns with m broadcast over the channels.
    x = (x.reshape(P, 3 * s, s) @ m.transpose(1, 2)).view(P, 3, s, s)
    return m.unsqueeze(1) @ x


def _resize_weights(start: torch.Tensor, length: torch.Tensor, size: int, n_in: int) -> torch.Tensor:
    """(P, size, n_in) weights that resize the crop [start, start + length) of an n_in-pixel axis to ``size``
    pixels as ATen's antialiased bilinear resize (torchvision's ``resized_crop``) does. start, length: (P,) long.

    Output pixel i is centred at c = (i + 0.5) * scale crop pixels, scale = length / size; crop pixel k weighs
    tent((k + 0.5 - c) / max(scale, 1)) (widened when downsampling: the antialiasing), normalised to sum 1.
    """
    device = start.device
    scale = length.float() / size  # (P,)
    support = scale.clamp(min=1.0).view(-1, 1, 1)
    centre = scale.view(-1, 1, 1) * (torch.arange(size, device=device, dtype=torch.float32).view(1, -1, 1) + 0.5)
    k = (torch.arange(n_in, device=device).view(1, -1) - start.view(-1, 1)).unsqueeze(1)  # (P, 1, n_in)
    w = (1 - ((k + 0.5 - centre) / support).abs()).clamp_(min=0)  # (P, size, n_in)
    w = w.masked_fill_((k < 0) | (k >= length.view(-1, 1, 1)), 0.0)
    return w.div_(w.sum(dim=-1, keepdim=True))


def _max_crop_side(aug: Augment, height: int, width: int) -> int:
    """An upper bound of the crop sides (pixels) :func:`_crop_boxes` can draw: the largest accepted attempt, or
    the fallback box where an attempt can be rejected."""
    lo, hi = height * width * aug.scale[0], height * width * aug.scale[1]
    w_max, h_max = round(math.sqrt(hi * aug.ratio[1])), round(math.sqrt(hi / aug.ratio[0]))
    w_min, h_min = round(math.sqrt(lo * aug.ratio[0])), round(math.sqrt(lo / aug.ratio[1]))
    side = max(min(width, w_max), min(height, h_max))
    if w_max > width or h_max > height or min(w_min, h_min) < 1:  # an attempt can fail: the fallback box
        side = max(side, *_fallback_box(aug, height, width))
    return side


def _sample_positions(start: torch.Tensor, length: torch.Tensor, size: int, n_in: int) -> torch.Tensor:
    """(P, size) grid_sample coordinates in [-1, 1] that upsample the crop [start, start + length) of an n_in-pixel
    axis to ``size`` pixels: source position (i + 0.5) * length / size - 0.5, clamped to the crop's edge pixel
    centres as ATen's resize of the cropped image does."""
    i = torch.arange(size, device=start.device, dtype=torch.float32)
    scale = (length.float() / size).view(-1, 1)
    src = ((i + 0.5) * scale - 0.5).clamp_(min=0).minimum(length.view(-1, 1) - 1)  # in crop pixels
    return (2 * (start.view(-1, 1) + src) + 1) / n_in - 1


def _crop_flip(images: torch.Tensor, params: PatchParams, aug: Augment, n_patches: int) -> torch.Tensor:
    """(n_patches * B, 3, size, size): torchvision's ``hflip(resized_crop(..., antialias=True))`` per patch of
    images (B, 3, H, W) float. No crop larger than the patch (the CIFAR recipes): one bilinear ``grid_sample`` per
    image, its patches stacked along the grid's height; else Wy @ image @ Wx^T (:func:`_resize_weights`)."""
    B, _, H, W = images.shape
    size = aug.size
    left, top, width, height = params.crop.unbind(1)
    flip = params.flip
    if _max_crop_side(aug, H, W) <= size:
        gx = _sample_positions(left, width, size, W)  # (P, size)
        gx = torch.where(flip.view(-1, 1), gx.flip(1), gx)
        gy = _sample_positions(top, height, size, H)
        gx = gx.view(n_patches, B, 1, size).transpose(0, 1)  # (B, n_patches, 1, size)
        gy = gy.view(n_patches, B, size, 1).transpose(0, 1)
        grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1).reshape(B, n_patches * size, size, 2)
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # (B, 3, n_patches * size, size) -> (n_patches * B, 3, size, size)
        return out.view(B, 3, n_patches, size, size).permute(2, 0, 1, 3, 4).reshape(-1, 3, size, size)
    wx = _resize_weights(left, width, size, W)  # (P, size, W)
    wx = torch.where(flip.view(-1, 1, 1), wx.flip(1), wx)
    wy = _resize_weights(top, height, size, H)  # (P, size, H)
    wx = wx.view(n_patches, B, size, W).permute(1, 3, 0, 2).reshape(B, W, n_patches * size)
    cols = images.reshape(B, 3 * H, W) @ wx  # (B, 3H, n_patches * size)
    # (n_patches * B, H, 3 * size): one (size, H) @ (H, 3 size) product per patch.
    cols = cols.view(B, 3, H, n_patches, size).permute(3, 0, 2, 1, 4).reshape(-1, H, 3 * size)
    out = wy @ cols  # (P, size, 3 * size)
    return out.view(-1, size, 3, size).transpose(1, 2).contiguous()


def take_patches(params: PatchParams, start: int, stop: int) -> PatchParams:
    """Patches start:stop of ``params`` (patch-major: patches i..j of every one of B images are ``i * B .. j * B``)."""
    return PatchParams(**{f.name: getattr(params, f.name)[start:stop] for f in fields(params)})


@functools.lru_cache(maxsize=16)
def _per_channel(values: tuple[float, float, float], device: torch.device) -> torch.Tensor:
    """(1, 3, 1, 1) float32 per-channel constants, filled on the device from Python floats (a copy from pageable
    host memory would wait for the GPU)."""
    with torch.inference_mode(False):  # plain tensors even if first made under inference mode
        t = torch.empty(1, 3, 1, 1, device=device)
        for c, v in enumerate(values):
            t[:, c].fill_(v)
    return t


def _pixel_augment_(x: torch.Tensor, params: PatchParams, aug: Augment, out: torch.Tensor) -> torch.Tensor:
    """Colour jitter, grayscale, blur, solarize and normalisation of cropped patches x: (P, 3, s, s) float32,
    overwritten; the result goes into ``out``, whose dtype and layout ride on the last pass (or ``x`` itself)."""
    if aug.jitter_p > 0:
        x = _color_jitter(x, params, aug)
    if aug.gray_p > 0:
        x = torch.where(params.gray.view(-1, 1, 1, 1), _grayscale(x), x, out=x)
    if aug.blur_p > 0:
        # Blurred for every patch and selected: a data-dependent subset would need a host sync.
        x = torch.where(params.blur.view(-1, 1, 1, 1), _gaussian_blur(x, params.sigma, aug.blur_sigma[1]), x, out=x)
    if aug.solarize_p > 0:
        # PIL's ImageOps.solarize inverts pixels >= 128, i.e. >= 0.5 here; an infinite threshold (patches not
        # solarized) folds the per-patch draw into the one comparison.
        threshold = torch.where(params.solarize, 0.5, math.inf).view(-1, 1, 1, 1)
        x = torch.where(x >= threshold, 1 - x, x, out=x)
    return torch.div(x.sub_(_per_channel(aug.mean, x.device)), _per_channel(aug.std, x.device), out=out)


@torch.no_grad()
def apply_params(images: torch.Tensor, params: PatchParams, aug: Augment, n_patches: int,
                 out_dtype: torch.dtype = torch.float32,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Make the patches described by ``params`` from ``images`` (B, 3, H, W), uint8 or float in [0, 1].

    Returns (n_patches, B, 3, size, size) in ``out_dtype``, normalised; with ``torch.channels_last`` its
    ``.flatten(0, 1)`` is channels_last. Computed in float32 (autocast off), whatever the output dtype.
    """
    if memory_format not in (torch.contiguous_format, torch.channels_last):
        raise AugmentError(f"memory_format must be torch.contiguous_format or torch.channels_last, got {memory_format}")
    B = images.shape[0]
    P = n_patches * B
    if params.flip.shape[0] != P:
        raise AugmentError(f"params hold {params.flip.shape[0]} patches, expected {n_patches} x {B}")
    size, device = aug.size, images.device
    with torch.autocast(device_type=device.type, enabled=False):
        # Converted once per batch; the crop's matmul then reads each image for all of its patches.
        x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        x = _crop_flip(x, params, aug, n_patches)  # (P, 3, size, size)
        if out_dtype == torch.float32 and memory_format == torch.contiguous_format:
            out = x  # normalised in place
        else:
            out = torch.empty(P, 3, size, size, dtype=out_dtype, device=device, memory_format=memory_format)
        # The pixel ops are a chain of memory-bound elementwise passes. On CPU, chunks whose temporaries
        # stay in cache and get reused by the allocator are faster; on GPU one chunk keeps launches few.
        chunk = P if device.type != "cpu" else max(1, _CPU_CHUNK_ELEMENTS // x[0].numel())
        for start in range(0, P, chunk):
            stop = min(start + chunk, P)
            _pixel_augment_(x[start:stop], take_patches(params, start, stop), aug, out[start:stop])
    # Splitting the leading dim keeps the strides of `out`: flatten(0, 1) gives back the (P, 3, s, s) layout.
    return out.view(n_patches, B, 3, size, size)


def make_patches(images: torch.Tensor, n_patches: int, aug: Augment, generator: torch.Generator,
                 out_dtype: torch.dtype = torch.float32,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """(n_patches, B, 3, aug.size, aug.size) augmented patches of ``images`` (B, 3, H, W), uint8 or float in [0, 1]:
    ``patches[i]`` holds patch i of every image. ``generator``, on the images' device, is required (the global
    one's patches could not be reproduced); ``out_dtype`` and ``memory_format`` as in :func:`apply_params`."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise AugmentError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
        raise TypeError(f"images must be uint8 (0..255) or float in [0, 1], got {images.dtype}")
    if images.dtype.is_floating_point and images.numel():
        lo, hi = images.aminmax()
        if not (0 <= lo and hi <= 1):  # also false for NaN
            hint = "; divide by 255 (or pass uint8)" if hi > 1 and hi <= 255 else ""
            raise AugmentError(f"float images must lie in [0, 1], got values in [{float(lo):g}, {float(hi):g}]"
                               f"{hint}")
    if isinstance(n_patches, bool) or not isinstance(n_patches, int) or n_patches < 1:
        raise AugmentError(f"n_patches must be a whole number >= 1, got {n_patches!r}")
    if not isinstance(aug, Augment):
        raise TypeError(f"aug must be an empssl.Augment, got {type(aug).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator on the images' device (seeded, so that the patches "
                        f"can be reproduced), got {generator!r}")
    if torch.device(generator.device).type != images.device.type:
        raise AugmentError(f"the generator is on {generator.device} but the images are on {images.device}")
    B, _, H, W = images.shape
    params = sample_params(n_patches, B, aug, generator, images.device, image_hw=(H, W))
    return apply_params(images, params, aug, n_patches, out_dtype, memory_format)


class MultiPatch(nn.Module):
    """:func:`make_patches` as a transform: (3, H, W) -> (n_patches, 3, s, s); (B, 3, H, W) -> (n_patches, B, 3, s, s).

    ``generator=None`` seeds each call from torch's global generator, which a ``DataLoader`` seeds per worker (a
    generator given here would be copied into every worker, which would then cut the same patches)."""

    def __init__(self, n_patches: int = 20, aug: Augment | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.n_patches, self.aug, self.generator = n_patches, aug or Augment(), generator

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        one = isinstance(images, torch.Tensor) and images.dim() == 3
        generator = self.generator
        if generator is None and isinstance(images, torch.Tensor):
            seed = int(torch.empty((), dtype=torch.int64).random_())  # from the global generator
            generator = torch.Generator(images.device).manual_seed(seed)
        patches = make_patches(images[None] if one else images, self.n_patches, self.aug, generator)
        return patches[:, 0] if one else patches

    def extra_repr(self) -> str:
        return f"n_patches={self.n_patches}, aug={self.aug}"
