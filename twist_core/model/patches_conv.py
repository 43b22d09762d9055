"""The frozen patch stem with a trainable convolutional stage above it (``--backbone patches-conv``).

The ``patches`` backbone trains only the MLP head on fixed pooled codes. Here the code maps are first averaged
to a small fixed grid (cheap: the stem still runs a slice of images at a time, in cache, and never needs a
backward pass), then a 1x1 and a 3x3 convolution with BatchNorm and ReLU learn combinations of neighbouring
codes, trained by TWIST like any backbone. Their pooled output is concatenated with the stem's own pooled codes,
so the stage adds learned features to the strong fixed ones instead of having to rediscover them from a random
start, and the first steps are as good as the ``patches`` backbone. The trainable part costs about as much as
the stem's forward pass on a CPU, since it runs on a 6 x 6 grid rather than the full-resolution maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from twist_core.model.patches import CACHE_CHUNK, POOL_GRID, PatchBackbone, region_average

CODE_GRID = 6  # the code maps are averaged to 6 x 6 regions before the trainable stage (POOL_GRID divides it)
STAGE_CHANNELS = 128


class PatchConvBackbone(PatchBackbone):
    """Frozen stem -> 6x6 code grid -> [1x1 conv-BN-ReLU -> 3x3 conv-BN-ReLU] -> 3x3 pooling, beside the codes.

    A :class:`PatchBackbone` (same stem, same dictionary fitting), whose feature is
    ``[BN(pooled codes), pooled learned maps]``.
    """

    def __init__(self, atoms: int, channels: int = STAGE_CHANNELS):
        super().__init__(atoms)
        codes = self.stem.out_channels
        self.stage = nn.Sequential(
            nn.Conv2d(codes, channels, kernel_size=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        for module in self.stage.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.feature_dim = codes * POOL_GRID * POOL_GRID + channels * POOL_GRID * POOL_GRID

    def code_grid(self, images: torch.Tensor) -> torch.Tensor:
        """Code maps averaged to CODE_GRID x CODE_GRID, a slice of images at a time (see the stem's forward)."""
        with torch.no_grad():  # the stem is frozen: no gradient needs to reach it or the images
            if torch.onnx.is_in_onnx_export():
                return region_average(self.stem.code_maps(images), CODE_GRID)
            return torch.cat([F.adaptive_avg_pool2d(self.stem.code_maps(chunk), CODE_GRID)
                              for chunk in images.split(CACHE_CHUNK)])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.code_grid(images)
        codes = region_average(grid, POOL_GRID)  # exact: every 3x3 region is a 2x2 block of the 6x6 grid
        learned = region_average(self.stage(grid), POOL_GRID)
        return torch.cat([self.norm(torch.flatten(codes, 1)), torch.flatten(learned, 1)], 1)
