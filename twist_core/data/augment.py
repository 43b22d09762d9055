"""The TWIST augmentation policy applied to whole uint8 batches at once (CPU or GPU).

One ``affine_grid``/``grid_sample`` does crop, resize and flip for the batch; colour jitter, greyscale,
blur and solarize are per-sample tensor ops. This keeps the loop from waiting on per-image PIL work and
runs on the GPU when there is one. Randomness comes from an explicit generator, so a run is reproducible
and resumes exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from twist_core.data.preprocess import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class ViewSpec:
    """How to make one view: crop size and scale range, and the probability of each photometric op."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0


@dataclass(frozen=True)
class AugmentPolicy:
    """Two global views (blur always on the first, solarize only on the second) plus optional local views."""

    global_size: int
    local_size: int
    n_local: int = 0
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    solarize_p: float = 0.2
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def views(self) -> list[ViewSpec]:
        first, second, local = self.blur_p
        specs = [ViewSpec(self.global_size, self.global_scale, first),
                 ViewSpec(self.global_size, self.global_scale, second, self.solarize_p)]
        specs += [ViewSpec(self.local_size, self.local_scale, local)] * self.n_local
        return specs


TWO_VIEW_SCALE = (0.08, 1.0)  # the reference's two-view recipe
MULTI_CROP_GLOBAL_SCALE = (0.4, 1.0)  # only together with local crops, which cover the small scales
LOCAL_SCALE = (0.05, 0.4)
# The patches backbones train only above a frozen stem; their defaults were measured with these crops (the
# guide, section 1; bench/results/photos.json), not with the ResNet recipe's smaller ones.
FIXED_STEM_SCALE = (0.4, 1.0)
SELF_LABEL_GLOBAL_SCALE = (0.14, 1.0)  # the reference's self-labelling stage: harder crops
SELF_LABEL_LOCAL_SCALE = (0.05, 0.14)


def policy_for_size(image_size: int, n_local: int = 0, self_labelling: bool = False,
                    fixed_stem: bool = False) -> AugmentPolicy:
    """The reference policy at 224 px, or its small-image version (CIFAR-like 32-64 px).

    Global crops span (0.08, 1) of the image with two views and (0.4, 1) with local crops, as the reference's
    two recipes do (``fixed_stem``: the patches backbones keep the (0.4, 1) they were measured with); the
    self-labelling stage uses its harder crops. Blur radius scales with the image; local
    crops are about 3/7 of the global size, as 96/224.
    """
    local = max(8, round(image_size * 96 / 224 / 2) * 2)
    sigma_scale = image_size / 224
    max_sigma = 2.0 * sigma_scale
    # Below half a pixel a Gaussian kernel is the identity in all but name: skip the work (32 px: 0.29 px).
    blur_p = (1.0, 0.1, 0.5) if max_sigma >= 0.5 else (0.0, 0.0, 0.0)
    if self_labelling:
        global_scale, local_scale = SELF_LABEL_GLOBAL_SCALE, SELF_LABEL_LOCAL_SCALE
    else:
        two_view = FIXED_STEM_SCALE if fixed_stem else TWO_VIEW_SCALE
        global_scale, local_scale = (MULTI_CROP_GLOBAL_SCALE if n_local else two_view), LOCAL_SCALE
    return AugmentPolicy(global_size=image_size, local_size=local, n_local=n_local, global_scale=global_scale,
                         local_scale=local_scale, blur_sigma=(0.1 * max(sigma_scale, 0.25), max_sigma),
                         blur_p=blur_p)


def _random_crop_flip(images: torch.Tensor, spec: ViewSpec, generator: torch.Generator) -> torch.Tensor:
    """Random-resized-crop (area in ``spec.scale``, aspect 3/4-4/3) and horizontal flip, batched."""
    n, device = images.shape[0], images.device
    rand = torch.rand(n, 5, generator=generator, device=device)
    area = spec.scale[0] + (spec.scale[1] - spec.scale[0]) * rand[:, 0]
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rand[:, 1]
    ratio = torch.exp(log_ratio)
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    centre_x = (1 - width) * (2 * rand[:, 2] - 1)
    centre_y = (1 - height) * (2 * rand[:, 3] - 1)
    flip = torch.where(rand[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta, [n, 3, spec.size, spec.size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _grey(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _colour_jitter(images: torch.Tensor, policy: AugmentPolicy, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation, hue with per-sample factors; identity where not applied."""
    n, device = images.shape[0], images.device
    brightness, contrast, saturation, hue = policy.jitter
    apply = (torch.rand(n, generator=generator, device=device) < policy.jitter_p).float()

    def factor(strength: float, centre: float) -> torch.Tensor:
        drawn = _uniform(n, centre - strength, centre + strength, generator, device)
        return (apply * drawn + (1 - apply) * centre).view(n, 1, 1, 1)

    b, c, s, h = factor(brightness, 1.0), factor(contrast, 1.0), factor(saturation, 1.0), factor(hue, 0.0)
    images = (images * b).clamp(0, 1)
    mean = _grey(images).mean(dim=(2, 3), keepdim=True)
    images = ((images - mean) * c + mean).clamp(0, 1)
    grey = _grey(images)
    images = ((images - grey) * s + grey).clamp(0, 1)
    # Hue: rotate the chroma plane of YIQ by 2*pi*h.
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          device=device, dtype=images.dtype)
    from_yiq = torch.linalg.inv(to_yiq)
    angle = 2 * math.pi * h.view(n)
    rotation = torch.zeros(n, 3, 3, device=device, dtype=images.dtype)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = torch.cos(angle), -torch.sin(angle)
    rotation[:, 2, 1], rotation[:, 2, 2] = torch.sin(angle), torch.cos(angle)
    matrix = from_yiq @ rotation @ to_yiq
    images = torch.einsum("nij,njhw->nihw", matrix, images)
    return images.clamp(0, 1)


def _gaussian_blur(images: torch.Tensor, apply_p: float, sigma_range: tuple[float, float],
                   generator: torch.Generator) -> torch.Tensor:
    """Separable Gaussian blur, each sample with its own sigma (near-zero sigma where not applied)."""
    n, channels, height, width = images.shape
    device = images.device
    apply = torch.rand(n, generator=generator, device=device) < apply_p
    sigma = _uniform(n, *sigma_range, generator, device)
    if not bool(apply.any()):
        return images
    radius = max(1, min(math.ceil(3 * sigma_range[1]), (min(height, width) - 1) // 2))
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=images.dtype)
    kernels = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    identity = (offsets == 0).to(images.dtype).expand(n, -1)
    kernels = torch.where(apply.view(-1, 1), kernels / kernels.sum(1, keepdim=True), identity)
    kernels = kernels.repeat_interleave(channels, 0)  # one kernel per (sample, channel)
    flat = images.reshape(1, n * channels, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernels.view(-1, 1, 1, 2 * radius + 1),
                    groups=n * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernels.view(-1, 1, 2 * radius + 1, 1),
                    groups=n * channels)
    return flat.view(n, channels, height, width)


class BatchAugment:
    """``augment(uint8 N x 3 x S x S, generator) -> list of normalised float views``."""

    def __init__(self, policy: AugmentPolicy):
        self.policy = policy
        self.specs = policy.views()

    def view(self, images: torch.Tensor, spec: ViewSpec, generator: torch.Generator) -> torch.Tensor:
        policy = self.policy
        n, device = images.shape[0], images.device
        out = _random_crop_flip(images, spec, generator)
        out = _colour_jitter(out, policy, generator)
        grey = torch.rand(n, generator=generator, device=device) < policy.gray_p
        out = torch.where(grey.view(n, 1, 1, 1), _grey(out).expand_as(out), out)
        out = _gaussian_blur(out, spec.blur_p, policy.blur_sigma, generator)
        solarize = (torch.rand(n, generator=generator, device=device) < spec.solarize_p).view(n, 1, 1, 1)
        out = torch.where(solarize & (out >= 0.5), 1.0 - out, out)
        mean = torch.tensor(policy.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(policy.std, device=device).view(1, 3, 1, 1)
        return (out - mean) / std

    def __call__(self, images: torch.Tensor, generator: torch.Generator,
                 partners: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every view of ``images``; with ``partners`` (uint8, same shape) the second view is made from them
        instead (mined neighbours, paired image by image)."""
        floats = images.float().div_(255.0)
        sources = [floats] * len(self.specs)
        if partners is not None:
            sources[1] = partners.float().div_(255.0)
        return [self.view(source, spec, generator) for source, spec in zip(sources, self.specs, strict=True)]
