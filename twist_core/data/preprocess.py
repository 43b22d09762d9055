"""The preprocessing contract, in one place: what every stage does to an image before the network sees it.

Training decodes each image to a square of ``decode_size(input_size)`` px (shorter side resized with bicubic
filtering, central square kept); training takes random crops of it, while evaluation, the exported model and
inference take its central ``input_size`` square. Pixels are scaled to [0, 1] and normalised with the
ImageNet mean and std. Images of at most ``SMALL_IMAGE_MAX`` px (CIFAR-like) are decoded at the crop size
itself; larger ones at 256/224 of it, as the ImageNet recipe does.

The sizes are recorded in ``ModelSpec`` (and so in every checkpoint) and copied from there into the model
card; :func:`spec_sizes` derives them for a checkpoint written before they were recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from twist_core.data.folder import DEFAULT_MAX_PIXELS, decode_image, resize_center_crop, to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE_MAX = 64  # px: at or below this an image is "small" (decoded at the crop size, small ResNet stem)
INTERPOLATION = "bicubic"
ImageLike = Image.Image | str | Path | np.ndarray


def is_small(size: int) -> bool:
    """Whether a training size counts as a small image (CIFAR-like): no 256/224 margin, the 3x3 stem."""
    return size <= SMALL_IMAGE_MAX


def decode_size(input_size: int) -> int:
    """Square side images are decoded to before cropping: the crop itself for small images, else 256 for 224."""
    return input_size if is_small(input_size) else round(input_size * 256 / 224)


def spec_sizes(model_spec: Mapping[str, Any], training_config: Mapping[str, Any]) -> tuple[int, int]:
    """``(input_size, resize_size)`` of a checkpoint: recorded in its model spec, else (older checkpoints)
    derived once here from the training config's ``image_size``."""
    input_size = int(model_spec.get("input_size") or training_config["image_size"])
    resize_size = int(model_spec.get("resize_size") or decode_size(input_size))
    return input_size, resize_size


def centre_crop_normalise(images: torch.Tensor, crop: int) -> torch.Tensor:
    """uint8 N x 3 x S x S -> central ``crop`` square -> float normalised with the ImageNet mean/std (torch)."""
    size = images.shape[-1]
    top = (size - crop) // 2
    images = images[..., top:top + crop, top:top + crop].float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def normalise_array(batch: np.ndarray, mean: tuple[float, ...] = IMAGENET_MEAN,
                    std: tuple[float, ...] = IMAGENET_STD) -> np.ndarray:
    """uint8 N x H x W x 3 -> the model's float32 N x 3 x H x W input (numpy, no torch needed)."""
    shift = np.asarray(mean, dtype=np.float32) * 255.0
    scale = 1.0 / (np.asarray(std, dtype=np.float32) * 255.0)
    out = (batch.astype(np.float32) - shift) * scale
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def card_fields(input_size: int, resize_size: int) -> dict[str, Any]:
    """The model card's description of this contract (read back by :meth:`Preprocess.from_card`)."""
    return {"input_size": input_size, "resize_size": resize_size,
            "resize": f"shorter side to {resize_size} px ({INTERPOLATION}), then the central "
                      f"{input_size} x {input_size} square",
            "interpolation": INTERPOLATION, "channel_order": "RGB", "layout": "NCHW", "dtype": "float32",
            "scale": "pixel / 255, then (x - mean) / std", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


@dataclass(frozen=True)
class Preprocess:
    """The card's preprocessing contract; small and picklable so decoding workers can apply it."""

    input_size: int
    resize_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> Preprocess:
        return cls(int(card["input_size"]), int(card["resize_size"]), tuple(card["mean"]), tuple(card["std"]))

    def load(self, item: ImageLike) -> Image.Image:
        """Any supported input as an RGB PIL image; JPEGs decode at reduced scale when that is enough."""
        if isinstance(item, Image.Image):
            return to_rgb(item)
        if isinstance(item, str | Path):
            return decode_image(item, self.max_pixels, draft_size=self.resize_size)
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or not (item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (3, 4))):
                raise ValueError(f"expected an HxWx3 (or HxW) uint8 array, got {item.dtype} {item.shape}")
            return to_rgb(Image.fromarray(item))
        raise TypeError(f"cannot read an image from {type(item).__name__}")

    def crop(self, image: Image.Image) -> np.ndarray:
        """Shorter side to ``resize_size``, central ``input_size`` square, as uint8 H x W x 3."""
        image = resize_center_crop(to_rgb(image), self.resize_size)
        if self.resize_size != self.input_size:
            offset = (self.resize_size - self.input_size) // 2
            image = image.crop((offset, offset, offset + self.input_size, offset + self.input_size))
        return np.asarray(image, dtype=np.uint8)

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x 3 to the model's float32 N x 3 x H x W input."""
        return normalise_array(batch, self.mean, self.std)

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.normalize(self.crop(image)[None])[0]
