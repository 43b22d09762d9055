"""The batched TWIST augmentation: view shapes, reproducibility, and each photometric op doing its job."""

from __future__ import annotations

import torch

from twist_core.data.augment import AugmentPolicy, BatchAugment, policy_for_size
from twist_core.data.preprocess import IMAGENET_MEAN, IMAGENET_STD


def images(n: int = 8, size: int = 48) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def test_views_have_policy_sizes_and_are_reproducible() -> None:
    augment = BatchAugment(policy_for_size(32, n_local=2))
    first = augment(images(), torch.Generator().manual_seed(5))
    again = augment(images(), torch.Generator().manual_seed(5))
    other = augment(images(), torch.Generator().manual_seed(6))
    assert [tuple(v.shape) for v in first] == [(8, 3, 32, 32)] * 2 + [(8, 3, 14, 14)] * 2
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], first[1])  # the two twins differ


def test_standard_preset_matches_the_reference_sizes() -> None:
    policy = policy_for_size(224, n_local=6)
    assert (policy.global_size, policy.local_size, policy.n_local) == (224, 96, 6)
    assert policy.blur_p == (1.0, 0.1, 0.5) and policy.blur_sigma == (0.1, 2.0)
    assert policy_for_size(32).blur_p == (0.0, 0.0, 0.0)  # sub-pixel blur is skipped


def denormalise(view: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return view * std + mean


def test_identity_policy_only_crops_and_flips() -> None:
    """With every photometric op off and a full-image crop, a view is the image or its mirror."""
    policy = AugmentPolicy(global_size=16, local_size=8, global_scale=(1.0, 1.0), jitter_p=0.0, gray_p=0.0,
                           blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)
    coarse = images(16, 4).float()  # smooth images: resampling a slightly narrower crop changes them little
    source = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear").round().to(torch.uint8)
    view = denormalise(BatchAugment(policy)(source, torch.Generator().manual_seed(1))[0])
    expected = source.float() / 255
    mirrored = expected.flip(-1)
    for i in range(16):
        error = min((view[i] - expected[i]).abs().mean(), (view[i] - mirrored[i]).abs().mean())
        assert error < 0.08  # a full-area crop, aspect within 3/4-4/3, resampled bilinearly


def test_greyscale_and_solarize() -> None:
    grey = AugmentPolicy(global_size=16, local_size=8, global_scale=(1.0, 1.0), jitter_p=0.0, gray_p=1.0,
                         blur_p=(0.0, 0.0, 0.0), solarize_p=1.0)
    view1, view2 = (denormalise(v) for v in BatchAugment(grey)(images(4, 16), torch.Generator().manual_seed(2)))
    assert torch.allclose(view1[:, 0], view1[:, 1], atol=1e-5) and torch.allclose(view1[:, 1], view1[:, 2], atol=1e-5)
    assert float(view2.max()) <= 0.5 + 1e-5  # solarize (second view only) inverts everything above one half
    assert float(view1.max()) > 0.6


def test_blur_smooths() -> None:
    blur = AugmentPolicy(global_size=48, local_size=8, global_scale=(1.0, 1.0), jitter_p=0.0, gray_p=0.0,
                         blur_p=(1.0, 0.0, 0.0), blur_sigma=(2.0, 2.0), solarize_p=0.0)
    blurred, sharp = (denormalise(v) for v in BatchAugment(blur)(images(4, 48), torch.Generator().manual_seed(3)))
    def roughness(x: torch.Tensor) -> float:
        return float((x[..., 1:] - x[..., :-1]).abs().mean())
    assert roughness(blurred) < 0.5 * roughness(sharp)


def test_crop_scales_follow_the_reference_recipes() -> None:
    assert policy_for_size(32).global_scale == (0.08, 1.0)  # two views: the reference's two-view recipe
    assert policy_for_size(32, fixed_stem=True).global_scale == (0.4, 1.0)  # patches: the measured crops
    multi = policy_for_size(224, n_local=12)
    assert multi.global_scale == (0.4, 1.0) and multi.local_scale == (0.05, 0.4)
    harder = policy_for_size(224, n_local=12, self_labelling=True)
    assert harder.global_scale == (0.14, 1.0) and harder.local_scale == (0.05, 0.14)
    assert policy_for_size(32, self_labelling=True).global_scale == (0.14, 1.0)
