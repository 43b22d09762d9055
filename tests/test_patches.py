"""The patch-dictionary stem: the folded convolution computes the textbook encoding, and the codes are useful."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from twist_core.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from twist_core.model.patches import (
    CACHE_CHUNK,
    PATCH,
    POOL_GRID,
    STRIDE,
    THRESHOLD,
    PatchBackbone,
    PatchDictionaryStem,
    kmeans,
    learn_patch_dictionary,
    normalise_patches,
    region_average,
)
from twist_core.model.patches_conv import PatchConvBackbone


def load_folder(root: Path) -> tuple[torch.Tensor, np.ndarray]:
    files = sorted(root.rglob("*.png"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    labels = np.array([f.parent.name for f in files])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def normalised(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def test_folded_convolution_equals_the_explicit_patch_encoding(shapes_folder: Path) -> None:
    images, _ = load_folder(shapes_folder)
    dictionary = learn_patch_dictionary(images, atoms=16, n_patches=5_000, iterations=3)
    stem = PatchDictionaryStem(16)
    stem.load_dictionary(dictionary)
    codes = stem.code_maps(normalised(images[:4])).double()

    # Textbook: every 6x6 patch -> contrast-normalise -> subtract mean -> whiten -> dot with atoms -> split.
    patches = F.unfold(images[:4].double(), PATCH, stride=STRIDE)  # 4 x 108 x positions
    side = (images.shape[-1] - PATCH) // STRIDE + 1
    flat = normalise_patches(patches.transpose(1, 2).reshape(-1, patches.shape[1]))
    response = ((flat - dictionary.patch_mean) @ dictionary.whitening) @ dictionary.atoms.T
    expected = torch.cat([F.relu(response - THRESHOLD), F.relu(-response - THRESHOLD)], 1)
    expected = expected.reshape(4, side, side, -1).permute(0, 3, 1, 2)
    assert codes.shape == expected.shape == (4, 32, side, side)
    assert torch.allclose(codes, expected, atol=2e-3, rtol=1e-3)
    assert (codes > 0).float().mean() > 0.05  # not an all-zero encoding


def test_dictionary_is_deterministic_and_whitens(shapes_folder: Path) -> None:
    images, _ = load_folder(shapes_folder)
    first = learn_patch_dictionary(images, atoms=8, seed=3, n_patches=4_000, iterations=2)
    again = learn_patch_dictionary(images, atoms=8, seed=3, n_patches=4_000, iterations=2)
    other = learn_patch_dictionary(images, atoms=8, seed=4, n_patches=4_000, iterations=2)
    assert torch.equal(first.atoms, again.atoms) and not torch.equal(first.atoms, other.atoms)
    assert torch.allclose(first.atoms.norm(dim=1), torch.ones(8, dtype=torch.float64))
    assert torch.allclose(first.whitening, first.whitening.T)


def test_codes_are_invariant_to_brightness_and_contrast(shapes_folder: Path) -> None:
    images, _ = load_folder(shapes_folder)
    stem = PatchDictionaryStem(8)
    stem.load_dictionary(learn_patch_dictionary(images, atoms=8, n_patches=4_000, iterations=2))
    darker = (images.float() * 0.6 + 20).round().to(torch.uint8)  # a different exposure of the same scene
    codes, darker_codes = stem.code_maps(normalised(images)), stem.code_maps(normalised(darker))
    change = (codes - darker_codes).abs().mean() / codes.abs().mean()
    assert change < 0.1, change


def test_pooled_codes_separate_shapes_that_pixels_do_not(shapes_folder: Path) -> None:
    """Stripes at random phase and colour are far apart in pixel space but alike in a patch code."""
    images, labels = load_folder(shapes_folder)
    backbone = PatchBackbone(16).eval()
    backbone.stem.load_dictionary(learn_patch_dictionary(images, atoms=16, n_patches=8_000, iterations=5))
    backbone.norm.train()
    with torch.no_grad():
        backbone(normalised(images))  # BatchNorm statistics of this set
        backbone.norm.eval()
        features = backbone(normalised(images))

    def nearest_neighbour_accuracy(vectors: torch.Tensor) -> float:
        unit = F.normalize(vectors.double(), dim=1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-2)
        return float((labels[similarity.argmax(1).numpy()] == labels).mean())

    pixels = images.flatten(1).float()
    assert features.shape == (len(images), backbone.feature_dim)
    assert nearest_neighbour_accuracy(features) >= 0.95
    assert nearest_neighbour_accuracy(features) > nearest_neighbour_accuracy(pixels - pixels.mean(0))


def test_pooled_forward_in_slices_equals_pooling_the_whole_batch(shapes_folder: Path) -> None:
    images, _ = load_folder(shapes_folder)
    stem = PatchDictionaryStem(8)
    stem.load_dictionary(learn_patch_dictionary(images, atoms=8, n_patches=4_000, iterations=2))
    batch = normalised(images[:CACHE_CHUNK + 7])  # one full slice and a partial one
    expected = F.adaptive_avg_pool2d(stem.code_maps(batch), POOL_GRID)
    assert torch.allclose(stem(batch), expected, atol=1e-5)


def test_onnx_region_average_equals_adaptive_pooling() -> None:
    maps = torch.randn(2, 5, 14, 11)
    for grid in (1, 3, 4):
        assert torch.allclose(region_average(maps, grid), F.adaptive_avg_pool2d(maps, grid), atol=1e-6)


def test_conv_stage_keeps_the_stem_codes_and_trains_only_above_the_stem(shapes_folder: Path) -> None:
    images, _ = load_folder(shapes_folder)
    dictionary = learn_patch_dictionary(images, atoms=8, n_patches=4_000, iterations=2)
    plain, conv = PatchBackbone(8), PatchConvBackbone(8, channels=16)
    plain.stem.load_dictionary(dictionary)
    conv.stem.load_dictionary(dictionary)
    batch = normalised(images[:CACHE_CHUNK + 5])  # 32 px: 14 x 14 code maps, pooled through the 6 x 6 grid
    features = conv(batch)
    codes = plain.stem.out_channels * POOL_GRID * POOL_GRID
    assert features.shape == (len(batch), conv.feature_dim) and conv.feature_dim == codes + 16 * POOL_GRID**2
    # The frozen half equals the patches backbone's features where the regions nest exactly (64 px: 30 x 30 maps).
    large = F.interpolate(batch, size=64, mode="bilinear", align_corners=False)
    assert torch.allclose(conv(large)[:, :codes], plain(large), atol=1e-4)
    features.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.stage.parameters())
    assert not any(t.requires_grad for t in conv.stem.buffers())


def test_patches_conv_run_exports_to_onnx_with_dynamic_size(shapes_folder: Path, tmp_path: Path) -> None:
    """A real run with --backbone patches-conv, exported; onnxruntime matches PyTorch at several sizes."""
    from conftest import tiny_train_config

    from twist_core.deploy.export import ExportConfig, ProbabilityModel, export_model
    from twist_core.deploy.infer import OnnxModel
    from twist_core.model.checkpoint import load_checkpoint
    from twist_core.model.network import ModelSpec, TwistModel
    from twist_core.train.loop import train

    run = tmp_path / "run"
    train(tiny_train_config(shapes_folder, run, backbone="patches-conv", epochs=1))
    model_path = export_model(ExportConfig(run=str(run), out=str(tmp_path / "model.onnx")))
    checkpoint = load_checkpoint(run)
    model = TwistModel(ModelSpec(**checkpoint["model_spec"]))
    model.load_state_dict(checkpoint["model"])
    assert isinstance(model.backbone, PatchConvBackbone) and model.embedding_dim == 64  # the head's hidden layer
    onnx_model = OnnxModel(model_path, device="cpu")
    for size in (32, 57, 96):
        images = np.random.default_rng(size).normal(0, 1, (3, 3, size, size)).astype(np.float32)
        probs, embeddings = onnx_model.predict_arrays(images)
        with torch.no_grad():
            ref_embeddings, ref_probs = ProbabilityModel(model).eval()(torch.from_numpy(images))
        np.testing.assert_allclose(probs, ref_probs.numpy(), atol=1e-4)
        np.testing.assert_allclose(embeddings, ref_embeddings.numpy(), atol=1e-3, rtol=1e-4)


def test_kmeans_finds_planted_centres_and_reseeds_empty_clusters() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 10
    points = (centres.repeat_interleave(500, 0) + torch.randn(2000, 4, generator=generator) * 0.1)
    found = kmeans(points, 4, 20, torch.Generator().manual_seed(1))
    nearest = torch.cdist(centres, found).min(1).values
    assert nearest.max() < 0.5, found  # every planted centre has an atom on it
    # more atoms than distinct points: every iteration leaves clusters empty; they are re-seeded, never NaN
    few = centres.repeat_interleave(3, 0)
    found = kmeans(few, 8, 5, torch.Generator().manual_seed(2))
    assert torch.isfinite(found).all() and torch.cdist(found, centres).min(1).values.max() < 1e-5
