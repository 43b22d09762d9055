"""What ``--backbone auto`` and ``--image-size 0`` choose, from the images and the machine, and how it is announced.

The photo default was chosen by measurement: bench/photos.py trains every candidate for 15 minutes on caltech20
(1,891 photos, 20 classes) on a 2-core CPU and keeps the best clustering; its table is bench/results/photos.json.
"""

from __future__ import annotations

import torch

from twist_core.data.preprocess import is_small

PHOTO_SIDE = 64  # a folder whose median shorter side is above this (px) is a photo folder
# The winner on caltech20 in 15 minutes on a 2-core CPU: the frozen stem + MLP head at 64 px, ahead of
# patches-conv and a ResNet-18 from scratch (the guide's table in section 1, "Photo folders";
# bench/results/photos.json).
PHOTO_BACKBONE = "patches"
PHOTO_IMAGE_SIZE = 64
PATCH_MAX_SIZE = 128  # auto never puts the patch stem on larger training images
# Mean training images/s over 15- and 20-minute runs on the benchmarks' 2-core CPU
# (bench/results/photos.json; 32 px: bench/results/recipe.json, patches after).
MEASURED_IMAGES_PER_S: dict[tuple[str, int], float] = {
    ("patches", 64): 431.0,
    ("patches-conv", 64): 166.0,
    ("patches", 32): 946.0,
}
TORCHVISION_INIT = "--backbone resnet50 --init torchvision:resnet50"


def auto_image_size(side: int, device: torch.device, pretrained: bool = False) -> int:
    """Training size for a folder whose median shorter side is ``side`` px (pretrained ResNets keep 224 px)."""
    if side <= 24:
        return 16
    if side <= 40:
        return 32
    if device.type != "cuda" and side > PHOTO_SIDE and not pretrained:
        return PHOTO_IMAGE_SIZE
    return 64 if side <= 96 else 224


def auto_backbone(image_size: int, side: int | None, device: torch.device, pretrained: bool = False) -> str:
    """The patch stem on a CPU (small images: ``patches``; photos: the measured winner), else a ResNet-18.

    With ``--init`` weights photos keep the ResNet the weights are for; small images still get the patch stem,
    which then refuses ``--init`` with a message.
    """
    if device.type == "cuda" or image_size > PATCH_MAX_SIZE:
        return "resnet18"
    if side is not None and side > PHOTO_SIDE:
        return "resnet18" if pretrained else PHOTO_BACKBONE
    return "patches" if is_small(image_size) else "resnet18"


def expected_speed(backbone: str, image_size: int, device: torch.device) -> float | None:
    """Training images/s measured for this backbone and size on the benchmarks' 2-core CPU (None: not measured)."""
    return None if device.type == "cuda" else MEASURED_IMAGES_PER_S.get((backbone, image_size))


def announcement(backbone: str, image_size: int, width: int, side: int | None, device: torch.device) -> list[str]:
    """The first lines of ``twist train``: what will run, how fast it was measured, and the ImageNet route."""
    unit = "atoms" if backbone.startswith("patches") else "channels"
    lines = [f"training {backbone} ({width} {unit}) on {image_size} px images on {device.type}"
             + (f" (median image side {side} px)" if side else "")]
    speed = expected_speed(backbone, image_size, device)
    if speed:
        lines.append(f"expected speed: about {speed:.0f} images/s on a 2-core CPU (measured; more cores go faster)")
    if device.type != "cuda" and side is not None and side > PHOTO_SIDE:
        lines.append(f"photos on a CPU: to start from ImageNet weights where this machine can download them, "
                     f"use {TORCHVISION_INIT} (slower per image, but pretrained)")
    return lines
