"""The stem's patch initialisation: filters follow the images' own patch statistics."""

from __future__ import annotations

import torch
from torch import nn

from twist_core.model import whiten_stem


def test_stem_filters_span_the_patches_and_come_in_sign_pairs() -> None:
    generator = torch.Generator().manual_seed(0)
    colour = torch.tensor([0.8, -0.5, 0.33])
    colour = colour / colour.norm()
    field = torch.randn(64, 1, 16, 16, generator=generator)
    images = field * colour.view(1, 3, 1, 1)  # every patch lies in colour (x) R^9: a 9-d subspace of R^27
    conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
    norm_before = conv.weight.view(16, -1).norm(dim=1).mean()
    whiten_stem(conv, images)
    filters = conv.weight.view(16, -1)
    basis = torch.kron(colour.view(3, 1), torch.eye(9))  # 27 x 9, orthonormal columns
    inside = (filters[:8] @ basis).norm(dim=1) / filters[:8].norm(dim=1)
    assert torch.allclose(inside, torch.ones(8), atol=1e-4)  # the top 8 directions lie in the patch subspace
    torch.testing.assert_close(filters[8:], -filters[:8])  # both polarities survive the ReLU
    torch.testing.assert_close(filters.norm(dim=1), norm_before.expand(16), rtol=1e-4, atol=1e-6)


def test_channels_beyond_the_patch_dimension_stay_random() -> None:
    conv = nn.Conv2d(3, 64, 3, padding=1, bias=False)  # 27-d patches: at most 27 sign pairs
    before = conv.weight.detach().clone()
    whiten_stem(conv, torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(conv.weight[54:], before[54:]) and not torch.equal(conv.weight[:54], before[:54])
