"""The options of a training run and how each ``auto`` is chosen from the images and the machine.

``TrainConfig`` is what the command line, a config file or a saved run gives; ``resolve_auto`` fills its
``auto`` choices before anything is written, so ``RUN/config.json`` holds what ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from twist_core.config import AUTO, AutoConfig, auto_option, checked_file_values, option
from twist_core.data.folder import DEFAULT_MAX_PIXELS, NoImagesError
from twist_core.data.preprocess import is_small
from twist_core.errors import UserError
from twist_core.model.init_weights import InitWeights, check_fits
from twist_core.train.budget import check_budget
from twist_core.train.photo_defaults import auto_backbone, auto_image_size

# Patches recipe, chosen by 5-minute runs on cifar10-test over 128/256/400 atoms, tau 0.5/1.0 and MLP 2048/1024
# (bench/results/recipe.json).
PATCH_ATOMS = 256
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "lars": 1.5e-6, "adamw": 0.05}
DEFAULT_NEIGHBOUR_FRACTION = 0.5  # chosen in bench/results/neighbours.json
# Options added after runs were saved: a run that predates them resumes (or fine-tunes) with them off, as it ran.
ABSENT_FROM_OLDER_RUNS = {"neighbour_fraction": 0.0}
# Per 256 images. LARS: the paper's 0.5; AdamW: DINO's 5e-4 (0.1 makes AdamW diverge); SGD: calibrated here.
DEFAULT_LR = {"sgd": 0.1, "lars": 0.5, "adamw": 5e-4}


@dataclass
class TrainConfig(AutoConfig):
    data: str = option(None, "folder of images (searched recursively; folder names are never used as labels)")
    out: str = option("runs/twist", "run folder for config.json, metrics.jsonl, skipped.txt, checkpoints, curves.png")
    classes: int = option(10, "K, the number of classes to discover")
    overcluster: int = option(0, "clusters of a training-only over-clustering head (e.g. 3 x --classes): a finer "
                                 "clustering of the head's last hidden layer, trained by the same loss beside the "
                                 "K-way head and left out of the export; 0 = none. It helped photos and hurt small "
                                 "digits (guide, section 1, 'Clusters and what the embedding knows')")
    coarse_classes: str = option("", "extra coarser heads, e.g. 10 or 15,10 (each below --classes), trained by the "
                                     "same loss on the same layer: over-cluster with --classes 3x your guess and "
                                     "--coarse-classes your guess, then twist suggest-merges --measure heads merges "
                                     "the fine clusters the way the coarse heads group them (measured on "
                                     "cifar10-test: guide section 6, bench/results/merge.json coarse_heads)")
    recipe: str = option("default", "default: settings for one GPU or a CPU within a time budget; paper: the "
                                    "paper's ImageNet settings (ResNet-50, MLP 4096, tau 1, LARS lr 0.5 per 256, "
                                    "weight decay 1.5e-6, 12 local crops, 800 + 50 epochs; the file "
                                    "twist_core/train/recipes/paper.yaml) for every option left at its default",
                           choices=["default", "paper"])
    backbone: str = option("auto", "auto: on a CPU, patches for small images (<= 64 px) and the measured best for "
                                   "photos (bench/results/photos.json), else resnet18. A ResNet trains a "
                                   "representation (the exported embedding is its pooled feature); patches trains "
                                   "only a head on fixed features, a frozen patch dictionary fitted on the folder "
                                   "(the embedding is the head's first hidden layer); patches-conv trains a "
                                   "convolutional stage above that frozen stem (a representation at CPU cost)",
                           choices=["auto", "patches", "patches-conv", "resnet18", "resnet34", "resnet50"])
    width: int | str = auto_option(0, "patches: dictionary atoms; ResNet: channels of the first stage (64 = "
                                      "torchvision); auto: 256 atoms, or 64 channels on GPU and 16 on CPU")
    image_size: int | str = auto_option(0, "training crop size in px; auto: from the median image side: 16, 32 or "
                                           "64 (photos: 64 on a CPU, 224 on a GPU or with --init)")
    small_stem: bool | str = auto_option(None, "3x3 stride-1 stem without max-pool for small images; auto: size "
                                               "<= 64")
    hidden_dim: int | str = auto_option(0, "width of the projection MLP; auto: 1024 for patches, 2048 for ResNet")
    local_crops: int = option(0, "number of extra small local crops per image (multi-crop)")
    epochs: int = option(100, "training epochs")
    batch_size: int | str = auto_option(0, "images per process per step (global batch = this x processes); auto: "
                                           "256, or less for small folders so that an epoch has at least 16 steps")
    optimizer: str = option("sgd", "optimiser (SGD with Nesterov trained best in short runs here)",
                            choices=["sgd", "lars", "adamw"])
    lr: float | str = auto_option(None, "base learning rate per 256 images, scaled by global batch / 256; auto: "
                                        "per optimiser: sgd 0.1, lars 0.5 (the paper), adamw 5e-4")
    weight_decay: float | str = auto_option(None, "weight decay; auto: per optimiser: sgd 5e-4, lars 1.5e-6, adamw "
                                                  "0.05")
    momentum: float = option(0.9, "momentum (SGD, LARS)")
    lars_eta: float = option(0.001, "LARS trust coefficient")
    warmup_epochs: float = option(5.0, "linear warm-up length in epochs before the cosine decay")
    tau: float | str = auto_option(0, "softmax temperature of the sharpness/diversity terms and of exported "
                                      "probabilities; auto: 1.0 for patches, 0.5 for ResNet")
    lam1: float = option(0.0, "sharpness weight is (1 + lam1)")
    lam2: float = option(1.0, "diversity weight (the term that prevents collapse)")
    self_label_fraction: float | str = auto_option(
        -1, "share of the final steps spent in the self-labelling stage, which replaces the TWIST loss with "
            "confident pseudo-labels and restarts the learning rate at 10%% of the peak; 0 = off; auto: off (measured "
            "within a CPU budget, it did not help: guide section 6; bench/results/self_label.json); --recipe paper: "
            "50/850")
    neighbour_fraction: float | str = auto_option(
        -1, "share of the TWIST stage's final steps in which an image's second view may come from one of its "
            "nearest neighbours in the run's own embedding (mined with FAISS over the whole folder), so that the "
            "clusters learn what the embedding knows (SCAN's idea, inside TWIST's loss); 0 = off; auto: 0.5 "
            "(guide, section 1, 'Clusters and what the embedding knows'; bench/results/neighbours.json); "
            "--recipe paper: off")
    neighbour_k: int = option(20, "neighbours mined per image for the neighbour stage")
    neighbour_share: float = option(0.5, "in the neighbour stage, the chance that an image's second view is one of "
                                         "its neighbours rather than the image itself")
    neighbour_every: int = option(5, "re-mine the neighbours every N epochs of the neighbour stage (the embedding "
                                     "keeps changing)")
    self_label_keep: float = option(0.5, "share of the global batch, most confident first, used as pseudo-labels at "
                                         "the start of the stage; it rises by 0.1 to the end (paper: 0.5 -> 0.6)")
    time_budget: str | None = option(None, "fit the whole schedule to this wall-clock time (e.g. 20m, 1h30m); "
                                     "measured on the first steps, overrides --epochs")
    eval_data: str | None = option(None, "class-folder tree to evaluate on (ACC/NMI/ARI/kNN) during training")
    eval_every: int = option(5, "evaluate every N epochs (and at the start and the end) when --eval-data is given")
    init: str | None = option(None, "pretrained start for a ResNet: a torchvision state dict, a TWIST reference "
                                    "checkpoint (full or backbone-only; its head too when K matches) or "
                                    "torchvision:resnet18|resnet50 (from the torch hub cache); architecture, width and "
                                    "stem follow the weights")
    init_sha256: str | None = option(None, "sha256 of the --init file, recorded by the run", cli=False)
    seed: int = option(0, "random seed (data order, augmentation, initialisation)")
    workers: int | str = auto_option(-1, "decoding worker processes; auto: the CPU count, at most 8")
    cache: str = option("auto", "decode all images once into RAM: auto (when under 2 GB), ram or off",
                        choices=["auto", "ram", "off"])
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "refuse images with more pixels than this (decompression bombs)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    precision: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16 (with a grad scaler)",
                            choices=["auto", "fp32", "bf16", "fp16"])
    channels_last: bool = option(True, "channels-last memory format (faster convolutions on CPU and GPU)")
    compile: bool = option(False, "torch.compile the model (slow start, faster steps on GPU)")
    checkpoint_every: int = option(500, "also checkpoint every N steps within an epoch (0 = only per epoch)")
    resume: bool = option(False, "continue from RUN/last.pt exactly where it stopped")
    progress: bool = option(True, "show a progress bar")


RECIPES = Path(__file__).with_name("recipes")  # shipped option files: --recipe NAME, or --config RECIPES/NAME.yaml


def recipe_options(name: str) -> dict[str, Any]:
    """The options of the shipped recipe ``name`` (``recipes/NAME.yaml``), each checked as ``--config`` checks it."""
    return checked_file_values(TrainConfig, RECIPES / f"{name}.yaml", f"recipe {name}")


def apply_recipe(config: TrainConfig) -> TrainConfig:
    """``--recipe paper``: the paper's values for every option still at its default (explicit options win)."""
    if config.recipe == "default":
        return config
    defaults = TrainConfig()
    return dataclasses.replace(config, **{name: value for name, value in recipe_options(config.recipe).items()
                                          if getattr(config, name) == getattr(defaults, name)})


@dataclass(kw_only=True)
class ResolvedTrainConfig(TrainConfig):
    """The options that ran: every ``auto`` chosen, so training reads plain values and never casts or compares
    with ``auto``. Only ``device`` and ``cache`` may stay ``auto`` (where the run happens, not what it computes).
    ``RUN/config.json`` and the checkpoint hold this."""

    backbone: str
    width: int
    image_size: int
    small_stem: bool
    hidden_dim: int
    batch_size: int
    lr: float
    weight_decay: float
    tau: float
    self_label_fraction: float
    neighbour_fraction: float
    workers: int
    precision: str

    def __post_init__(self) -> None:
        left = [field.name for field in dataclasses.fields(self)
                if getattr(self, field.name) == AUTO and field.name not in ("device", "cache")]
        if left:
            raise ValueError(f"options left auto in a resolved config: {', '.join(left)}")  # a bug, not user input


class ConfigError(UserError, ValueError):
    """Options that contradict each other."""


def check_options(config: TrainConfig) -> None:
    """Refuse values no run can use before anything is decoded or written."""
    if config.classes < 1:
        raise ConfigError(f"--classes {config.classes}: give the number of classes to discover, at least 1 "
                          "(1 trains with a warning; 2 or more learn something)")
    try:
        check_budget(config.time_budget)
    except ValueError as error:
        raise ConfigError(f"--time-budget: {error}") from None
    if not 0.0 <= float(config.neighbour_share) <= 1.0:
        raise ConfigError(f"--neighbour-share {config.neighbour_share}: give a chance from 0 to 1")
    if config.neighbour_fraction != AUTO and not 0.0 <= float(config.neighbour_fraction) < 1.0:
        raise ConfigError(f"--neighbour-fraction {config.neighbour_fraction}: give a share from 0 (off) to below 1")
    if config.init and config.backbone.startswith("patches"):
        raise ConfigError("--init loads ResNet weights; the patches backbones have none: add --backbone resnet18 "
                          "(or resnet34/resnet50, as the weights are)")
    for name in ("epochs", "eval_every", "neighbour_k", "neighbour_every"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(config, name)}: must be at least 1")
    parse_coarse_classes(config.coarse_classes, config.classes)
    if config.overcluster and config.overcluster <= config.classes:
        raise ConfigError(f"--overcluster {config.overcluster}: the over-clustering head needs more clusters than "
                          f"--classes {config.classes} (or 0 for none)")


def parse_coarse_classes(text: str, classes: int) -> tuple[int, ...]:
    """``--coarse-classes`` as head sizes; each must be from 2 to ``classes - 1`` (a coarser clustering)."""
    parts = [part.strip() for part in str(text or "").split(",") if part.strip()]
    if not all(part.isdigit() for part in parts):
        raise ConfigError(f"--coarse-classes {text!r}: give whole numbers separated by commas, e.g. 10 or 15,10")
    sizes = tuple(int(part) for part in parts)
    bad = [k for k in sizes if not 2 <= k < classes]
    if bad:
        raise ConfigError(f"--coarse-classes {bad[0]}: each coarse head needs from 2 to {classes - 1} clusters "
                          f"(fewer than --classes {classes})")
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"--coarse-classes {text!r} repeats a size")
    return sizes


def median_image_side(root: Path, files: list[str], max_pixels: int, sample: int = 200) -> int:
    """Median shorter side over an evenly spread sample of the images (header reads only)."""
    from PIL import Image

    step = max(1, len(files) // sample)
    sides = []
    for name in files[::step][:sample]:
        try:
            with Image.open(root / name) as image:
                if image.size[0] * image.size[1] <= max_pixels:
                    sides.append(min(image.size))
        except Exception:  # unreadable files are reported during decoding
            continue
    if not sides:
        raise NoImagesError(f"none of the {len(files)} image files in {root} could be opened")
    return sorted(sides)[len(sides) // 2]


def resolve_auto(config: TrainConfig, root: Path, files: list[str], device: torch.device) -> TrainConfig:
    """Fill the ``auto`` choices from the images and the machine, so config.json records what ran."""
    changes: dict[str, Any] = {}
    side = None
    if config.image_size == AUTO:
        side = median_image_side(root, files, config.max_pixels)
        changes["image_size"] = auto_image_size(side, device, pretrained=bool(config.init))
    elif config.backbone == AUTO:
        with contextlib.suppress(NoImagesError):  # reported with reasons once decoding fails
            side = median_image_side(root, files, config.max_pixels)
    size = changes.get("image_size", config.image_size)
    if config.small_stem == AUTO:
        changes["small_stem"] = is_small(size)
    backbone = config.backbone
    if backbone == AUTO:
        backbone = changes["backbone"] = auto_backbone(size, side, device, pretrained=bool(config.init))
    patches = backbone.startswith("patches")
    if config.width == AUTO:
        changes["width"] = PATCH_ATOMS if patches else 64 if device.type == "cuda" else 16
    if config.hidden_dim == AUTO:
        changes["hidden_dim"] = 1024 if patches else 2048
    if config.tau == AUTO:
        changes["tau"] = 1.0 if patches else 0.5
    if config.self_label_fraction == AUTO:
        changes["self_label_fraction"] = 0.0
    if config.neighbour_fraction == AUTO:
        changes["neighbour_fraction"] = DEFAULT_NEIGHBOUR_FRACTION
    if config.weight_decay == AUTO:
        changes["weight_decay"] = DEFAULT_WEIGHT_DECAY[config.optimizer]
    if config.lr == AUTO:
        changes["lr"] = DEFAULT_LR[config.optimizer]
    if config.workers == AUTO:
        changes["workers"] = min(8, os.cpu_count() or 1)
    if config.precision == AUTO:
        changes["precision"] = "bf16" if device.type == "cuda" else "fp32"
    return dataclasses.replace(config, **changes)


def follow_init(config: TrainConfig, init: InitWeights) -> TrainConfig:
    """What ``--init`` decides: architecture, width and stem of its weights, and the head's width when K matches.

    Explicit options that contradict the weights stop the run here, before anything is written.
    """
    changes: dict[str, Any] = {"init_sha256": init.sha256}
    for name, value in (("backbone", init.architecture), ("width", init.width)):
        given = getattr(config, name)
        if given == AUTO:
            changes[name] = value
        elif given != value:
            raise ConfigError(f"--init {config.init} holds a {init.architecture} of width {init.width}: "
                              f"--{name} {given} cannot take it (leave --{name} out to follow the weights)")
    if config.small_stem == AUTO:
        changes["small_stem"] = init.small_stem
    if init.head_shape and init.head_shape[1] == config.classes and config.hidden_dim == AUTO:
        changes["hidden_dim"] = init.head_shape[0]
    config = dataclasses.replace(config, **changes)
    check_fits(init, config.backbone, config.width, bool(config.small_stem))
    return config


def auto_batch_size(n_images: int, world_size: int) -> int:
    """256 per process, halved until an epoch has at least 16 steps (small folders), never under 16."""
    size = 256
    while size > 16 and n_images < 16 * size * world_size:
        size //= 2
    return size


def warn_about_classes(classes: int, n_images: int) -> None:
    """K = 1 has nothing to learn, and a K above the image count leaves clusters empty; both still run."""
    if classes == 1:
        print("warning: --classes 1 puts every image in one cluster: the diversity term is zero and nothing is "
              "learned; use --classes 2 or more", file=sys.stderr)
    elif classes > n_images:
        print(f"warning: --classes {classes} is more than the {n_images} readable images: at least "
              f"{classes - n_images} clusters will stay empty", file=sys.stderr)
