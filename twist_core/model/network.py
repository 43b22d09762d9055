"""TWIST network: a backbone, the projection MLP and the non-affine BatchNorm over K logits.

The backbone is a torchvision-style ResNet, or, for small images on a CPU, the frozen patch-dictionary stem of
``patches.py`` (``backbone="patches"``, ``width`` = number of atoms).

The ResNet uses torchvision's residual blocks and keeps torchvision's parameter names, so ``--init``
(see ``init_weights.py``) loads torchvision and reference weights as they are. ``width`` narrows every stage
(64 is torchvision's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from twist_core.data.preprocess import spec_sizes
from twist_core.model.patches import PatchBackbone
from twist_core.model.patches_conv import PatchConvBackbone

# Block kind and blocks per stage. torchvision is imported only when a ResNet is built: it costs about a second
# per process (it pulls in torch._dynamo), which every patches run and every quick CLI error would pay.
ARCHITECTURES: dict[str, tuple[str, list[int]]] = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}
# Backbones built on the frozen patch stem (``width`` = atoms); their embedding is the head's hidden layer.
PATCH_BACKBONES: dict[str, type[PatchBackbone]] = {"patches": PatchBackbone, "patches-conv": PatchConvBackbone}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network (saved in checkpoints and model cards)."""

    backbone: str = "resnet18"
    width: int = 64
    small_stem: bool = False
    hidden_dim: int = 2048
    n_classes: int = 10
    tau: float = 1.0
    input_size: int = 0  # px of the central crop the network sees; 0 = not recorded (see checkpoint_spec)
    resize_size: int = 0  # px images are decoded to before that crop (preprocess.decode_size)
    coarse_classes: tuple[int, ...] = ()  # extra coarser heads (--coarse-classes), trained beside the K-way one
    overcluster: int = 0  # clusters of the training-only over-clustering head (--overcluster); 0 = none


def checkpoint_spec(checkpoint: dict[str, Any]) -> ModelSpec:
    """The model spec of a loaded checkpoint, with its preprocessing sizes (derived for older checkpoints)."""
    saved = dict(checkpoint["model_spec"])
    saved["coarse_classes"] = tuple(int(k) for k in saved.get("coarse_classes", ()))  # a list once saved as JSON
    spec = ModelSpec(**saved)
    input_size, resize_size = spec_sizes(checkpoint["model_spec"], checkpoint["config"])
    return dataclasses.replace(spec, input_size=input_size, resize_size=resize_size)


class ResNetBackbone(nn.Module):
    """ResNet up to global average pooling; ``forward`` returns the pooled feature (N x feature_dim)."""

    def __init__(self, backbone: str = "resnet18", width: int = 64, small_stem: bool = False):
        super().__init__()
        if backbone not in ARCHITECTURES:
            raise ValueError(f"unknown backbone {backbone!r}; choose from {', '.join(ARCHITECTURES)}")
        from torchvision.models.resnet import BasicBlock, Bottleneck

        kind, layers = ARCHITECTURES[backbone]
        block: type[BasicBlock | Bottleneck] = Bottleneck if kind == "bottleneck" else BasicBlock
        self.inplanes = width
        if small_stem:  # 32-64 px images: keep resolution, as CIFAR ResNets do
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0], stride=1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = width * 8 * block.expansion
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for module in self.modules():  # zero-init the last BN of each block: starts as identity, trains faster
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.bn3.weight)
            elif isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class TwistHead(nn.Module):
    """Linear-BN-ReLU-Linear-BN-ReLU-Linear to K logits, then BatchNorm1d(K, affine=False).

    The non-affine BN over the logits keeps every class in use early in training (Wang et al., "Self-Supervised
    Learning by Estimating Twin Class Distributions", arXiv:2110.07402).
    """

    def __init__(self, in_dim: int, hidden_dim: int, n_classes: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, n_classes),
        )
        self.logit_norm = nn.BatchNorm1d(n_classes, affine=False)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the first and the second hidden layer's activations and the normalised logits."""
        hidden = self.mlp[:3](features)
        last_hidden = self.mlp[3:6](hidden)
        return hidden, last_hidden, self.logit_norm(self.mlp[6](last_hidden))


def coarse_head(hidden_dim: int, n_classes: int) -> nn.Sequential:
    """A coarser clustering of the head's last hidden layer: one linear layer and the non-affine logit BN.

    Over-clustering (``--classes`` above the classes expected) gives finer clusters to browse, but merging them
    back without labels loses accuracy (bench/results/merge.json). A coarse head trained by the same TWIST loss
    on the same layer sees the same views, so its clusters nest the fine ones and say which of them belong
    together (``twist suggest-merges --measure heads``).
    """
    return nn.Sequential(nn.Linear(hidden_dim, n_classes), nn.BatchNorm1d(n_classes, affine=False))


class TwistModel(nn.Module):
    """``forward(images) -> (embedding, logits)``; probabilities are ``softmax(logits / tau)``.

    The embedding (what kNN search and the index use) is the ResNet's pooled feature, or, for the patches
    backbone, the head's first hidden layer: the frozen codes are generic and 2K x 9 wide, while that layer is
    trained for view invariance, 4.5x narrower and finds better neighbours (the kNN column of the guide's
    tables, section 1).
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.backbone: PatchBackbone | ResNetBackbone = (
            PATCH_BACKBONES[spec.backbone](spec.width) if spec.backbone in PATCH_BACKBONES
            else ResNetBackbone(spec.backbone, spec.width, spec.small_stem))
        self.head = TwistHead(self.backbone.feature_dim, spec.hidden_dim, spec.n_classes)
        self.coarse = nn.ModuleList(coarse_head(spec.hidden_dim, k) for k in spec.coarse_classes)
        # Training only: a finer clustering of the same layer by the same loss, which makes the K-way head's
        # clusters better on photos (guide, section 1, "Clusters and what the embedding knows"); the exported graph
        # never runs it.
        self.overcluster = nn.ModuleList([coarse_head(spec.hidden_dim, spec.overcluster)] if spec.overcluster else [])

    @property
    def embedding_dim(self) -> int:
        return self.spec.hidden_dim if self.spec.backbone in PATCH_BACKBONES else self.backbone.feature_dim

    def forward(self, images: torch.Tensor | list[torch.Tensor], all_heads: bool = False
                ) -> (tuple[torch.Tensor, torch.Tensor]
                      | tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]):
        """One batch, or the crops of a training step (a list; crops of one size run through the backbone
        together). Either way the head runs once on everything, so the logit BatchNorm normalises over all crops
        of the step, whatever their size, as the reference does; results come back in the order given.
        ``all_heads`` also returns the logits of every coarse head and of the over-clustering head (two lists,
        empty without them)."""
        if isinstance(images, torch.Tensor):
            features = self.backbone(images)
        else:
            features = torch.cat([self.backbone(torch.cat(group)) for group in _same_size_runs(images)])
        hidden, last_hidden, logits = self.head(features)
        embedding = hidden if self.spec.backbone in PATCH_BACKBONES else features
        if not all_heads:
            return embedding, logits
        return (embedding, logits, [head(last_hidden) for head in self.coarse],
                [head(last_hidden) for head in self.overcluster])

    def probabilities(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding, logits = self(images)
        return embedding, torch.softmax(logits / self.spec.tau, dim=-1)


def _same_size_runs(crops: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive crops of equal size grouped, in order (two globals, then the locals)."""
    runs: list[list[torch.Tensor]] = []
    for crop in crops:
        if runs and runs[-1][0].shape[-2:] == crop.shape[-2:]:
            runs[-1].append(crop)
        else:
            runs.append([crop])
    return runs


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm's running statistics on clean (un-augmented) inputs.

    Training sees only augmented views, so the running statistics, which eval mode and the exported model
    use, describe a different distribution from the images being labelled. For the non-affine BN over the
    logits this matters most: stale statistics shift whole classes and a short run's clean predictions
    pile into a few clusters. One pass in train mode with a cumulative average fixes that; weights are
    unchanged.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average over the whole pass
    model.train()
    every_head = isinstance(model, TwistModel)  # the coarse heads' BNs too
    for batch in batches:  # every batch, even one of a single image: skipping one would desync SyncBatchNorm
        model(batch, all_heads=True) if every_head else model(batch)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.train(was_training)
