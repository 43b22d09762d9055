"""Train TWIST on an unlabeled image folder, in one process or under torchrun.

Read top to bottom: configure, find and decode images, build model/optimiser, maybe resume, then the epoch
loop (augment -> forward -> loss -> step), checkpointing every epoch, every N steps, and on SIGTERM/SIGINT.
Run with ``twist train DATA --out RUN`` or ``torchrun --nproc_per_node N -m twist_core.train DATA --out RUN``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from twist_core import distributed
from twist_core.config import AUTO, AutoConfig, auto_option, option, save_config
from twist_core.data.augment import BatchAugment, policy_for_size
from twist_core.data.dataset import EpochBatches, FolderImages, decode_per_node, epoch_batches, make_loader
from twist_core.data.folder import DEFAULT_MAX_PIXELS, NoImagesError, decode_image, require_images, skipped_lines
from twist_core.data.preprocess import centre_crop_normalise, decode_size, is_small
from twist_core.errors import RunFailure, UserError
from twist_core.evaluation.evaluate import load_eval_images, predict_torch, score, summary_line
from twist_core.io_utils import atomic_write_text, mark_output_folder
from twist_core.model.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from twist_core.model.init_weights import InitWeights, check_fits, load_into, read_init
from twist_core.model.network import ModelSpec, TwistModel, recalibrate_batchnorm
from twist_core.model.patches import PatchBackbone, learn_patch_dictionary
from twist_core.stop_signals import StopRequested
from twist_core.train.budget import check_budget, fit_total_steps, format_duration, parse_duration
from twist_core.train.loss import self_label_loss, supervised_loss, twist_multicrop_loss
from twist_core.train.neighbours import broadcast_buffers, draw_partners, mine
from twist_core.train.optim import Schedule, StepPlan, build_optimizer
from twist_core.train.photo_defaults import announcement, auto_backbone, auto_image_size, expected_speed
from twist_core.train.speed import SpeedWatch
from twist_core.train.summary import run_summary, write_run_summary

METRICS_NAME = "metrics.jsonl"
RECALIBRATION_IMAGES = 10_000  # clean images whose BN statistics the exported model uses
DICTIONARY_PIXELS = 32 * 1024**2  # the patch dictionary is fitted on at most this many decoded pixels (10,000 at 32 px)
# Patches recipe, from 5-minute runs on cifar10-test (2-core CPU, ACC): 128/256/400 atoms, tau 0.5/1.0, MLP
# 2048/1024 -> 256 atoms, tau 1.0, MLP 1024 (0.44; tau 0.5: 0.33, 400 atoms: 0.36 at half the speed).
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
                                    "weight decay 1.5e-6, 12 local crops, 800 + 50 epochs) for every option left at "
                                    "its default", choices=["default", "paper"])
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
            "within a CPU budget, it never helped: patches on cifar10-test -1.2 and -0.9 points of ACC over two seeds, "
            "caltech20 -0.1, a ResNet from scratch 0.24 -> 0.18; bench/results/self_label.json); --recipe paper: "
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


PAPER_RECIPE: dict[str, Any] = {
    "backbone": "resnet50", "width": 64, "hidden_dim": 4096, "tau": 1.0, "optimizer": "lars", "lr": 0.5,
    "weight_decay": 1.5e-6, "local_crops": 12, "epochs": 850, "self_label_fraction": 50 / 850,
    "neighbour_fraction": 0.0,
}


def apply_recipe(config: TrainConfig) -> TrainConfig:
    """``--recipe paper``: the paper's values for every option still at its default (explicit options win)."""
    if config.recipe != "paper":
        return config
    defaults = TrainConfig()
    return dataclasses.replace(config, **{name: value for name, value in PAPER_RECIPE.items()
                                          if getattr(config, name) == getattr(defaults, name)})


class TrainingDiverged(RunFailure, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


class ResumeError(UserError, RuntimeError):
    """``--resume`` cannot continue this run as asked."""


class ConfigError(UserError, ValueError):
    """Options that contradict each other."""


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
    if patches and config.init:
        raise ConfigError("--init loads ResNet weights; the patches backbone has none: add --backbone resnet18 "
                          "(or resnet34/resnet50, as the weights are)")
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


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def forward_views(model: nn.Module, views: list[torch.Tensor], channels_last: bool
                  ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Logits of every view, split back per view, from one model call on all the crops of the step; and the
    same for each coarse head and for the over-clustering head (one list of views per head)."""
    if channels_last:
        views = [view.contiguous(memory_format=torch.channels_last) for view in views]
    _, logits, coarse, overcluster = model(views, all_heads=True)
    sizes = [view.shape[0] for view in views]
    return (list(logits.float().split(sizes)), [list(head.float().split(sizes)) for head in coarse],
            [list(head.float().split(sizes)) for head in overcluster])


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """``metrics.jsonl`` rewritten whole from the history the checkpoint carries, so it never runs ahead."""
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in history))


def write_skipped(path: Path, files: list[str], skipped: dict[int, str], folders: dict[str, str]) -> None:
    """``skipped.txt``: every folder the scan could not open, then every image that could not be decoded."""
    lines = skipped_lines(folders)
    lines += [f"{files[i]}\t{reason}" for i, reason in sorted(skipped.items(), key=lambda item: files[item[0]])]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


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


def warn_about_classes(classes: int, n_images: int) -> None:
    """K = 1 has nothing to learn, and a K above the image count leaves clusters empty; both still run."""
    if classes == 1:
        print("warning: --classes 1 puts every image in one cluster: the diversity term is zero and nothing is "
              "learned; use --classes 2 or more", file=sys.stderr)
    elif classes > n_images:
        print(f"warning: --classes {classes} is more than the {n_images} readable images: at least "
              f"{classes - n_images} clusters will stay empty", file=sys.stderr)


def train(config: TrainConfig, start_from: dict[str, torch.Tensor] | None = None,
          prepare: Callable[[Run], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the final epoch's metrics.

    Reads like facebookresearch/dino's main loop: set the run up, then one ``train_one_epoch`` per epoch and
    ``end_epoch`` to summarise, evaluate and checkpoint it. ``twist finetune`` starts from given weights
    (``start_from``) and adapts the run before the first step (``prepare``: labelled images, exclusions).
    """
    check_options(config)
    config = apply_recipe(config)
    with distributed.process_group(config.device) as ctx:
        run = setup_run(config, ctx, start_from)
        if prepare is not None:
            prepare(run)
        with run.stop.installed():
            if run.config.eval_data and not run.resumed:
                run.history.append({"epoch": 0, "step": 0, "eval": run.calibrate_and_evaluate(0)})
            if ctx.is_main:
                write_metrics(run.out / METRICS_NAME, run.history)  # on resume: rows past the checkpoint dropped
            metrics: dict[str, Any] = run.history[-1] if run.history else {}
            epoch = run.start_epoch
            while run.global_step < run.total_steps:
                metrics = end_epoch(run, epoch, train_one_epoch(run, epoch))
                epoch += 1
        if ctx.is_main:
            from twist_core.train.plots import plot_training_curves

            plot_training_curves(run.history, run.out / "curves.png")
            atomic_write_text(run.out / "DONE", json.dumps(metrics) + "\n")
            write_run_summary(run.out, run_summary(run.config, metrics, run.global_step,
                                                   run.batch_size * ctx.world_size, run.run_seconds()))
        return metrics


@dataclass
class BudgetClock:
    """``--time-budget``: this session's step time (evaluations excluded, after two warm-up steps)."""

    budget: float | None
    timed_steps: int = 0
    timed_since: float | None = None
    eval_seconds_in_loop: float = 0.0

    def step_done(self, steps_done_in_epoch: int) -> bool:
        """Count a step; True when the schedule should be refitted to the budget (every 10 timed steps)."""
        if self.budget is None:
            return False
        if self.timed_since is None:
            if steps_done_in_epoch == 2:
                self.timed_since = time.perf_counter()
            return False
        self.timed_steps += 1
        return self.timed_steps % 10 == 0  # small, frequent corrections keep every stage of the schedule

    def seconds_per_step(self) -> float | None:
        if self.budget is None or self.timed_since is None or self.timed_steps == 0:
            return None
        return (time.perf_counter() - self.timed_since - self.eval_seconds_in_loop) / self.timed_steps


@dataclass
class Supervision:
    """Labelled images mixed into every step, with a cross-entropy term on them (``twist finetune``).

    ``draw()`` returns uint8 images (as the batches hold them) and their classes; the step appends them to its
    batch, so the TWIST loss covers them too, and adds ``weight`` times their cross-entropy over every view.
    """

    draw: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    weight: float


@dataclass
class Run:
    """Everything a run holds between steps: configuration, data, model, optimiser and progress."""

    config: TrainConfig
    ctx: distributed.Context
    files: list[str]
    unreadable: dict[str, str]  # folder -> reason
    dataset: FolderImages
    cache: torch.Tensor | None
    skipped: dict[int, str]
    batch_size: int
    spec: ModelSpec
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    eval_data: Any
    history: list[dict[str, Any]]
    start_epoch: int  # epochs completed when this session started
    start_step_in_epoch: int
    global_step: int
    steps_per_epoch: int
    total_steps: int
    clock: BudgetClock
    prior_seconds: float
    resumed: bool
    speed: SpeedWatch  # this session's training speed against the expected one
    started: float = dataclasses.field(default_factory=time.perf_counter)  # of this session
    eval_seconds: float = 0.0
    stop: StopRequested = dataclasses.field(default_factory=StopRequested)
    supervision: Supervision | None = None  # twist finetune: labelled images and their cross-entropy
    neighbours: torch.Tensor | None = None  # files x k mined neighbour table (neighbour stage)
    neighbours_epoch: int = -1  # the epoch at whose start the table was mined
    paired_epoch: int = -1  # the last epoch whose batches carry neighbour partners

    def __post_init__(self) -> None:
        policy = functools.partial(policy_for_size, self.config.image_size, self.config.local_crops,
                                   fixed_stem=self.config.backbone.startswith("patches"))
        self.augment = BatchAugment(policy())
        self.augment_self_label = BatchAugment(policy(self_labelling=True))
        self.sampler = EpochBatches()
        self.loader = None if self.cache is not None else make_loader(
            self.dataset, self.sampler, self.config.workers, self.ctx.device.type == "cuda")

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def peak_lr(self) -> float:
        return float(self.config.lr) * self.batch_size * self.ctx.world_size / 256

    def schedule(self) -> Schedule:
        """The schedule for the current total step count (a time budget refits it while training)."""
        return Schedule(self.total_steps, round(self.config.warmup_epochs * self.steps_per_epoch), self.peak_lr,
                        self.config.self_label_fraction, self.config.self_label_keep,
                        neighbour_fraction=float(self.config.neighbour_fraction))

    def run_seconds(self) -> float:
        return self.prior_seconds + time.perf_counter() - self.started

    def checkpoint(self, epoch: int, step_in_epoch: int) -> None:
        if not self.ctx.is_main:
            return
        save_checkpoint(self.out / CHECKPOINT_NAME, {
            "format": 1, "config": dataclasses.asdict(self.config), "model_spec": dataclasses.asdict(self.spec),
            "model": plain_state_dict(self.model), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
            "global_step": self.global_step, "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch, "train_seconds": self.run_seconds(),
            "skipped": dict(self.skipped), "files": self.files, "history": self.history,
            "neighbours": self.neighbours, "neighbours_epoch": self.neighbours_epoch,
            "paired_epoch": self.paired_epoch,
        })

    def budget_left(self) -> float:
        """Seconds of ``--time-budget`` left for training, less a reserve for the final checkpoint, plot and exit."""
        budget = self.clock.budget or 0.0
        return budget - self.run_seconds() - (0.01 * budget + 2.0)

    def fit_length(self, epochs_done: int) -> None:
        """The one place the run's length (``total_steps``) is decided.

        Without ``--time-budget``: the epochs asked, at the current steps per epoch. With it: the steps that fit
        the time left at the measured step time (rank 0 decides: ranks must agree); until steps are timed, the
        epochs asked stand in, or, resumed, the length saved.
        """
        seconds_per_step = self.clock.seconds_per_step()
        if seconds_per_step is None or self.clock.budget is None:
            if self.clock.budget is None or self.total_steps == 0:
                self.total_steps = self.global_step + (self.config.epochs - epochs_done) * self.steps_per_epoch
            return
        fitted = fit_total_steps(self.global_step, seconds_per_step, self.budget_left(), self.steps_per_epoch,
                                 self.eval_seconds, self.config.eval_every)
        self.total_steps = distributed.broadcast_int(self.ctx, max(fitted, self.global_step, 1))

    def spread_images(self, limit: int) -> list[int]:
        """Up to ``limit`` readable training images, evenly spread over the folder."""
        valid = [i for i in range(len(self.files)) if i not in self.skipped]
        return valid[::max(1, len(valid) // limit)][:limit]

    def decoded_batches(self, batches: list[list[int]], replace_failures: bool = True) -> Iterator[torch.Tensor]:
        """These batches from the cache or decoded now. A file that fails now is replaced by a good image of its
        batch, so every batch keeps its size (ranks stay in lockstep), or left out."""
        if self.cache is not None:
            yield from (self.cache[torch.tensor(indices)] for indices in batches)
            return
        for _, images, errors in DataLoader(self.dataset, batch_sampler=batches, num_workers=self.config.workers):
            good = [k for k, error in enumerate(errors) if not error]
            if not replace_failures:
                yield images[torch.tensor(good, dtype=torch.long)]
                continue
            good = good or list(range(len(errors)))
            yield images[torch.tensor([k if not errors[k] else good[k % len(good)] for k in range(len(errors))])]

    def clean_batches(self) -> Iterator[torch.Tensor]:
        """Centre crops of up to RECALIBRATION_IMAGES training images, evenly spread, in this rank's share of a
        pass plan that makes every rank run the same number of batches of 2 or more images."""
        chosen = self.spread_images(RECALIBRATION_IMAGES)
        plan = distributed.pass_plan(len(chosen), self.ctx.world_size, self.batch_size)
        for images in self.decoded_batches(plan.batches(chosen, self.ctx.rank, self.ctx.world_size)):
            yield self.clean_crops(images)

    def clean_crops(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images as the network sees them outside training: normalised centre crops, on the device."""
        batch = centre_crop_normalise(images.to(self.ctx.device), self.config.image_size)
        return batch.contiguous(memory_format=torch.channels_last) if self.config.channels_last else batch

    def epoch_partners(self, epoch: int, batches: list[list[int]], first_step: int) -> list[list[int]] | None:
        """The neighbour partner of every image of this epoch's batches, or None when the epoch has no pairs.

        Decided at the epoch's start (mining first when the table is missing or ``--neighbour-every`` epochs
        old) and remembered in the checkpoint, so a run resumed inside the epoch pairs exactly as before.
        """
        config = self.config
        if first_step > 0:  # resumed inside the epoch: pair as it did, from the saved table
            paired = self.paired_epoch == epoch and self.neighbours is not None
        else:
            schedule = self.schedule()
            last_step = self.global_step + len(batches) - 1
            paired = schedule.neighbour_start <= last_step and self.global_step < schedule.self_label_start
            if paired and (self.neighbours is None or epoch - self.neighbours_epoch >= config.neighbour_every):
                self.mine_neighbours(epoch)
            self.paired_epoch = epoch if paired else self.paired_epoch
        if not paired or self.neighbours is None:
            return None
        generator = torch.Generator().manual_seed(config.seed * 1_000_033 + epoch * 7919 + self.ctx.rank)
        return draw_partners(self.neighbours, batches, float(config.neighbour_share), generator)

    def mine_neighbours(self, epoch: int) -> None:
        """Fresh clean-image BN statistics (rank 0's on every rank), then the neighbour table over every image."""
        from tqdm import tqdm

        began = time.perf_counter()
        with autocast(self.config.precision, self.ctx.device):
            recalibrate_batchnorm(self.model, self.clean_batches())
            broadcast_buffers(self.ctx, self.model)
            self.neighbours = mine(self.ctx, self.model, self.embedding_batches(), len(self.files),
                                   self.config.neighbour_k, self.config.seed)
        self.neighbours_epoch = epoch
        seconds = time.perf_counter() - began
        self.clock.eval_seconds_in_loop += seconds  # not a training step's time
        if self.config.progress and self.ctx.is_main:
            tqdm.write(f"neighbours mined for epoch {epoch + 1}: {self.config.neighbour_k} per image over "
                       f"{int((self.neighbours[:, 0] >= 0).sum())} images in {seconds:.1f} s", file=sys.stderr)

    def embedding_batches(self) -> Iterator[tuple[list[int], torch.Tensor]]:
        """This rank's share of every readable image, as (file indices, normalised centre crops)."""
        share = self.spread_images(len(self.files))[self.ctx.rank::self.ctx.world_size]
        batches = [share[i:i + self.batch_size] for i in range(0, len(share), self.batch_size)]
        source = (_cache_batches(self.cache, batches) if self.cache is not None else
                  DataLoader(self.dataset, batch_sampler=batches, num_workers=self.config.workers))
        for indices, images, errors in source:
            good = [k for k, error in enumerate(errors) if not error]
            yield [int(indices[k]) for k in good], self.clean_crops(images[torch.tensor(good, dtype=torch.long)])

    def calibrate_and_evaluate(self, epoch: int) -> dict[str, float] | None:
        """Fresh BN statistics on clean images (all ranks), then rank 0 scores the eval set if there is one."""
        from tqdm import tqdm

        began = time.perf_counter()
        with autocast(self.config.precision, self.ctx.device):
            recalibrate_batchnorm(self.model, self.clean_batches())
        if self.eval_data is None:
            return None
        probs, embeddings = predict_torch(self.model, self.eval_data.images, self.config.image_size, self.ctx.device)
        report = score(probs, embeddings, self.eval_data, embedding_kmeans=True, seed=self.config.seed)
        self.eval_seconds = time.perf_counter() - began
        if self.config.progress:
            tqdm.write(f"eval after epoch {epoch}: {summary_line(report)}", file=sys.stderr)
        return {name: report[name] for name in ("acc", "nmi", "ami", "ari", "knn_acc", "clusters_in_use",
                                                "kmeans_acc", "kmeans_nmi", "ece", "neighbour_disagreement")}


def open_run(config: TrainConfig, ctx: distributed.Context
             ) -> tuple[TrainConfig, list[str], dict[str, str], dict | None, InitWeights | None]:
    """Check the folders, load the checkpoint to resume and the ``--init`` weights, and fill every ``auto``."""
    out, root = Path(config.out), Path(config.data)
    unreadable: dict[str, str] = {}  # subfolders the scan could not open: listed in skipped.txt, never silent
    files = require_images(root, unreadable)
    resumed: dict[str, Any] | None = None
    if not config.resume and (out / CHECKPOINT_NAME).exists():
        # Metrics alone are no run: they are rewritten from the checkpoint, so a run killed before its
        # first checkpoint simply starts again.
        raise ResumeError(f"{out} already holds a run ({CHECKPOINT_NAME}): add --resume to continue it, or choose "
                          "another --out (nothing was changed)")
    if config.resume:
        if not (out / CHECKPOINT_NAME).exists():
            raise ResumeError(f"--resume: no checkpoint at {out / CHECKPOINT_NAME} (the run stopped before its first "
                              "checkpoint): start it again without --resume")
        resumed = load_checkpoint(out / CHECKPOINT_NAME)
        saved = resumed["config"]
        # The saved run defines everything; only where to run it may change.
        keep = {"device", "workers", "progress", "resume", "checkpoint_every", "eval_data", "eval_every"}
        known = {field.name for field in dataclasses.fields(TrainConfig)}  # options of older versions dropped
        config = TrainConfig(**{**ABSENT_FROM_OLDER_RUNS, **{k: v for k, v in saved.items() if k in known},
                                **{k: getattr(config, k) for k in keep}})
        if resumed["files"] != files:
            raise ResumeError(f"{root} changed since the run started ({len(resumed['files'])} files then, "
                               f"{len(files)} now): start a new run instead of --resume")
    init = None
    if config.init and not resumed:
        if config.backbone in ("patches", "patches-conv"):
            raise ConfigError("--init loads ResNet weights; the patches backbones have none: add --backbone "
                              "resnet18 (or resnet34/resnet50, as the weights are)")
        init = read_init(config.init)
        config = follow_init(config, init)
    config = resolve_auto(config, root, files, ctx.device)
    if ctx.is_main:
        with contextlib.suppress(NoImagesError):  # unreadable files are reported while decoding
            side = median_image_side(root, files, config.max_pixels)
            print("\n".join(announcement(config.backbone, config.image_size, config.width, side, ctx.device)),
                  file=sys.stderr)
    return config, files, unreadable, resumed, init


def local_world_size(ctx: distributed.Context) -> int:
    """Processes on this node (torchrun sets LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))


def load_images(config: TrainConfig, ctx: distributed.Context, files: list[str], skipped: dict[int, str]
                ) -> tuple[FolderImages, torch.Tensor | None]:
    """Decode every image once into RAM when it fits (failures into ``skipped``), else stream later."""
    root = Path(config.data)
    size = decode_size(config.image_size)
    dataset = FolderImages(root, files, size, config.max_pixels)
    cache_bytes = len(files) * 3 * size * size
    cache = None
    if config.cache == "ram" or (config.cache == AUTO and cache_bytes < 2 * 1024**3):
        cache, failures = decode_per_node(dataset, config.workers, ctx.rank, ctx.world_size, ctx.local_rank,
                                          local_world_size(ctx), config.progress and ctx.is_main)
        skipped.update(failures)
    elif not any(_readable(root / f, config.max_pixels) for f in files):
        raise NoImagesError(f"none of the {len(files)} image files in {root} could be decoded")
    if len(files) == len(skipped):
        raise NoImagesError(f"none of the {len(files)} image files in {root} could be decoded; see the reasons in "
                            f"{Path(config.out) / 'skipped.txt'}")
    return dataset, cache


def fitted_batch_size(config: TrainConfig, ctx: distributed.Context, n_valid: int) -> tuple[TrainConfig, int]:
    """The configured (or automatic) batch size, lowered when the folder cannot fill one global batch."""
    if config.batch_size == AUTO:
        config = dataclasses.replace(config, batch_size=auto_batch_size(n_valid, ctx.world_size))
    batch_size = config.batch_size
    if n_valid < batch_size * ctx.world_size:
        batch_size = max(2, n_valid // ctx.world_size)
        if ctx.is_main:
            print(f"warning: only {n_valid} readable images: batch size lowered to {batch_size} per process",
                  file=sys.stderr)
    return config, batch_size


def build_model(config: TrainConfig, spec: ModelSpec, ctx: distributed.Context, init: InitWeights | None,
                patch_sample: Callable[[], torch.Tensor] | None) -> TwistModel:
    """The network on its device: from ``--init``, or with its patch dictionary fitted (``patch_sample`` gives
    the images; None when a checkpoint will overwrite it anyway), or as initialised."""
    model = TwistModel(spec)
    if init is not None:
        head_loaded = load_into(model, init)
        if ctx.is_main:
            print(f"--init: {len(init.backbone)} backbone tensors from {init.file}"
                  f"{' and the head' if head_loaded else ''} (sha256 {init.sha256[:12]})", file=sys.stderr)
    elif isinstance(model.backbone, PatchBackbone) and patch_sample is not None:
        # Every rank fits the same dictionary from the same images; DDP would broadcast rank 0's anyway.
        sample = patch_sample()
        if ctx.is_main and config.progress:
            print(f"fitting the patch dictionary ({config.width} atoms) on {len(sample)} images", file=sys.stderr)
        model.backbone.stem.load_dictionary(learn_patch_dictionary(sample, config.width, seed=config.seed))
    if ctx.device.type == "cuda" and ctx.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(ctx.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def setup_run(config: TrainConfig, ctx: distributed.Context, start_from: dict[str, torch.Tensor] | None = None) -> Run:
    """Everything before the first step: options, data, model, optimiser, and the state to resume from.

    ``start_from``: weights for a new run to start with (``twist finetune``) instead of a fresh initialisation.
    """
    started = time.perf_counter()  # a time budget counts decoding and set-up too
    config, files, unreadable, resumed, init = open_run(config, ctx)
    torch.manual_seed(config.seed)
    out = Path(config.out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        mark_output_folder(out)
    skipped: dict[int, str] = dict(resumed["skipped"]) if resumed else {}
    dataset, cache = load_images(config, ctx, files, skipped)
    n_valid = len(files) - len(skipped)
    if ctx.is_main:
        write_skipped(out / "skipped.txt", files, skipped, unreadable)
        for folder, reason in sorted(unreadable.items()):
            print(f"warning: skipping folder {folder}/: {reason}", file=sys.stderr)
        for index, reason in sorted(skipped.items()):
            print(f"warning: skipping {files[index]}: {reason}", file=sys.stderr)
        warn_about_classes(config.classes, n_valid)
    config, batch_size = fitted_batch_size(config, ctx, n_valid)
    if ctx.is_main:
        save_config(config, out / "config.json")

    spec = ModelSpec(backbone=config.backbone, width=config.width, small_stem=bool(config.small_stem),
                     hidden_dim=config.hidden_dim, n_classes=config.classes, tau=config.tau,
                     coarse_classes=parse_coarse_classes(config.coarse_classes, config.classes),
                     overcluster=int(config.overcluster),
                     input_size=config.image_size, resize_size=decode_size(config.image_size))
    steps_per_epoch = resumed["steps_per_epoch"] if resumed else max(1, n_valid // (batch_size * ctx.world_size))

    def patch_sample() -> torch.Tensor:
        chosen = [i for i in range(len(files)) if i not in skipped]
        limit = max(100, DICTIONARY_PIXELS // (3 * dataset.size ** 2))
        chosen = chosen[::max(1, len(chosen) // limit)][:limit]
        batches = [chosen[i:i + batch_size] for i in range(0, len(chosen), batch_size)]
        if cache is not None:
            return torch.cat([cache[torch.tensor(b)] for b in batches])
        loader = DataLoader(Subset(dataset, chosen), batch_size=batch_size, num_workers=config.workers)
        return torch.cat([images[torch.tensor([not e for e in errors])] for _, images, errors in loader])

    model = build_model(config, spec, ctx, init, None if resumed or start_from else patch_sample)
    if resumed or start_from:
        unwrap(model).load_state_dict(resumed["model"] if resumed else start_from)
    optimizer = build_optimizer(config.optimizer, model, float(config.lr) * batch_size * ctx.world_size / 256,
                                float(config.weight_decay), config.momentum, config.lars_eta)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=config.precision == "fp16")
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        scaler.load_state_dict(resumed["scaler"])
    train_model: nn.Module = model
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if config.compile:
        train_model = torch.compile(train_model)
    eval_data = None
    if config.eval_data and ctx.is_main:
        eval_data = load_eval_images(config.eval_data, config.image_size, config.workers, config.max_pixels,
                                     progress=config.progress)
    run = Run(
        config=config, ctx=ctx, files=files, unreadable=unreadable, dataset=dataset, cache=cache, skipped=skipped,
        batch_size=batch_size,
        spec=spec, model=model, train_model=train_model, optimizer=optimizer, scaler=scaler, eval_data=eval_data,
        history=resumed["history"] if resumed else [],
        start_epoch=resumed["epoch"] if resumed else 0, start_step_in_epoch=resumed["step_in_epoch"] if resumed else 0,
        global_step=resumed["global_step"] if resumed else 0, steps_per_epoch=steps_per_epoch,
        total_steps=resumed["total_steps"] if resumed else 0,
        clock=BudgetClock(parse_duration(config.time_budget) if config.time_budget else None),
        prior_seconds=resumed["train_seconds"] if resumed else 0.0, resumed=resumed is not None, started=started,
        neighbours=resumed.get("neighbours") if resumed else None,
        neighbours_epoch=resumed.get("neighbours_epoch", -1) if resumed else -1,
        paired_epoch=resumed.get("paired_epoch", -1) if resumed else -1,
        speed=SpeedWatch(expected_speed(config.backbone, config.image_size, ctx.device), bool(config.time_budget)))
    if not resumed:  # a resumed run keeps the length it saved
        run.fit_length(0)
    return run


STAT_NAMES = ("loss", "consistency", "sharpness", "diversity", "self_label", "supervised", "coarse", "overcluster")


@dataclass
class EpochStats:
    """Sums over this rank's steps of one epoch; ``merged`` combines the ranks."""

    classes: int
    supervised: bool = False  # a Supervision adds its cross-entropy to the steps
    coarse: bool = False  # coarse heads add their TWIST loss to the steps
    overcluster: bool = False  # the over-clustering head adds its TWIST loss to the steps
    sums: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(STAT_NAMES, 0.0))
    steps: int = 0
    self_label_steps: int = 0
    images: int = 0
    lr: float = 0.0
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.cluster_counts = torch.zeros(self.classes, dtype=torch.float64)
        self.mean_probs = torch.zeros(self.classes, dtype=torch.float64)

    def add(self, parts: dict[str, torch.Tensor], first_view_probs: torch.Tensor, images: int, lr: float,
            self_labelling: bool) -> dict[str, float]:
        values = {name: value.detach().item() for name, value in parts.items()}
        for name, value in values.items():
            self.sums[name] += value
        probs = first_view_probs.double().cpu()
        self.cluster_counts += torch.bincount(probs.argmax(1), minlength=self.classes).double()
        self.mean_probs += probs.sum(0)
        self.steps += 1
        self.self_label_steps += int(self_labelling)
        self.images += images
        self.lr = lr
        return values

    def merged(self, ctx: distributed.Context) -> dict[str, Any]:
        """Per-step means over all processes, clusters in use and the entropy of the mean prediction."""
        totals = distributed.sum_across(ctx, torch.tensor([*self.sums.values(), float(self.steps), float(self.images),
                                                           float(self.self_label_steps)], dtype=torch.float64)).cpu()
        counts = distributed.sum_across(ctx, self.cluster_counts).cpu()
        mean = distributed.sum_across(ctx, self.mean_probs).cpu()
        mean = mean / mean.sum().clamp(min=1e-12)
        n_steps = max(1.0, float(totals[len(STAT_NAMES)]))
        elapsed = time.perf_counter() - self.started
        merged = {"lr": self.lr, **{name: float(totals[i]) / n_steps for i, name in enumerate(STAT_NAMES)},
                  "images_per_s": float(totals[len(STAT_NAMES) + 1]) / max(elapsed, 1e-9),
                  "clusters_in_use": int((counts > 0).sum()),
                  "mean_entropy": float(-(mean * torch.log(mean + 1e-12)).sum()),
                  "max_entropy": math.log(self.classes), "self_labelling": self.self_label_steps > 0,
                  "seconds": elapsed}
        if not self.supervised:
            merged.pop("supervised")
        if not self.coarse:
            merged.pop("coarse")
        if not self.overcluster:
            merged.pop("overcluster")
        self_label_steps = float(totals[len(STAT_NAMES) + 2])
        if self_label_steps == 0:
            merged.pop("self_label")
        else:  # a mean over the stage's steps only
            merged["self_label"] = float(totals[STAT_NAMES.index("self_label")]) / self_label_steps
        return merged


def step_loss(run: Run, images: torch.Tensor, plan: StepPlan, partners: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """Augment, forward every crop at once, and the step's loss: TWIST, or in the last stage self-labelling.

    ``partners`` (the neighbour stage): the images whose view replaces each image's second view.
    """
    config, ctx = run.config, run.ctx
    generator = torch.Generator(device=ctx.device).manual_seed(config.seed * 1_000_003 + run.global_step * 1009
                                                               + ctx.rank)
    targets = None
    if run.supervision is not None:  # labelled images join the batch: the TWIST loss sees them too
        labelled, targets = run.supervision.draw()
        images = torch.cat([images, labelled.to(images.device)])
        targets = torch.cat([torch.full((len(images) - len(labelled),), -1), targets]).to(images.device)
        if partners is not None:  # a labelled image pairs with itself
            partners = torch.cat([partners, labelled.to(partners.device)])
    views = (run.augment_self_label(images, generator) if plan.self_labelling
             else run.augment(images, generator, partners))
    with autocast(config.precision, ctx.device):
        view_logits, coarse_logits, overcluster_logits = forward_views(run.train_model, views, config.channels_last)
    if plan.self_labelling:  # the stage's cross-entropy replaces the TWIST loss, still logged as "loss"
        with torch.no_grad():
            parts = twist_multicrop_loss(view_logits, 2, config.tau, config.lam1, config.lam2)
        loss = parts["self_label"] = self_label_loss(view_logits, 2, config.tau, plan.keep)
    else:
        parts = twist_multicrop_loss(view_logits, 2, config.tau, config.lam1, config.lam2)
        loss = parts["loss"]
    if coarse_logits:  # each coarse head by the TWIST loss, their mean added with weight 1
        parts["coarse"] = torch.stack([twist_multicrop_loss(head, 2, config.tau, config.lam1, config.lam2)["loss"]
                                       for head in coarse_logits]).mean()
        loss = loss + parts["coarse"]
    if overcluster_logits:  # the over-clustering head by the TWIST loss, added with weight 1
        parts["overcluster"] = twist_multicrop_loss(overcluster_logits[0], 2, config.tau, config.lam1,
                                                    config.lam2)["loss"]
        loss = loss + parts["overcluster"]
    if run.supervision is not None and targets is not None:
        parts["supervised"] = supervised_loss(view_logits, targets, config.tau)
        loss = loss + run.supervision.weight * parts["supervised"]
    return loss, parts, view_logits


def train_one_epoch(run: Run, epoch: int) -> EpochStats:
    """One pass over this rank's batches (from where a resumed run stopped), checkpointing on the way."""
    from tqdm import tqdm

    config, ctx = run.config, run.ctx
    batches = epoch_batches(len(run.files), run.batch_size, epoch, config.seed, ctx.rank, ctx.world_size,
                            exclude=set(run.skipped))
    first_step = run.start_step_in_epoch if epoch == run.start_epoch else 0
    partners = run.epoch_partners(epoch, batches, first_step)
    run.sampler.batches = batches[first_step:] if partners is None else [
        batch + partner for batch, partner in zip(batches[first_step:], partners[first_step:], strict=True)]
    run.train_model.train()
    stats = EpochStats(config.classes, supervised=run.supervision is not None,
                       coarse=bool(unwrap(run.model).coarse), overcluster=bool(unwrap(run.model).overcluster))
    source = _cache_batches(run.cache, run.sampler.batches) if run.cache is not None else iter(run.loader)
    # Under a time budget the epoch count is refitted as the speed is measured: the bar shows the time left.
    total = "" if run.clock.budget is not None else f"/{math.ceil(run.total_steps / run.steps_per_epoch)}"
    bar = tqdm(total=len(batches), initial=first_step, desc=f"epoch {epoch + 1}{total}", unit="step",
               disable=not (config.progress and ctx.is_main), dynamic_ncols=True)
    for step_in_epoch, (indices, images, errors) in enumerate(source, start=first_step):
        if run.global_step >= run.total_steps:
            break
        images, partner_images = drop_failures(run, indices, images, errors, paired=partners is not None)
        plan = run.schedule().at(run.global_step)
        for group in run.optimizer.param_groups:
            group["lr"] = plan.lr
        images = images.to(ctx.device, non_blocking=True)
        if partner_images is not None and plan.neighbours:
            partner_images = partner_images.to(ctx.device, non_blocking=True)
        else:
            partner_images = None
        loss, parts, view_logits = step_loss(run, images, plan, partner_images)
        if distributed.any_rank(ctx, not bool(torch.isfinite(loss))):
            raise TrainingDiverged(
                f"the loss became {loss.item()} at epoch {epoch + 1}, step {step_in_epoch + 1}: training stopped. "
                f"The last good checkpoint ({run.out / CHECKPOINT_NAME}) is intact; try a lower --lr or --precision "
                "fp32, then --resume or start again.")
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.global_step += 1
        with torch.no_grad():
            probs = torch.softmax(view_logits[0].detach() / config.tau, -1)
        values = stats.add(parts, probs, images.shape[0], plan.lr, plan.self_labelling)
        seconds = max(time.perf_counter() - stats.started, 1e-9)
        bar.set_postfix(loss=f"{loss.detach().item():.3f}", kl=f"{values['consistency']:.3f}",
                        sharp=f"{values['sharpness']:.3f}", div=f"{values['diversity']:.3f}",
                        img_s=f"{stats.images * ctx.world_size / seconds:.0f}",
                        left=format_duration(time_left(run, stats.steps, seconds)), refresh=False)
        bar.update(1)
        slow = run.speed.check(stats.images * ctx.world_size, seconds)
        if slow and ctx.is_main:
            tqdm.write(slow, file=sys.stderr)
        if run.clock.step_done(stats.steps):
            run.fit_length(epoch)
        if distributed.any_rank(ctx, run.stop.signal_number is not None):
            bar.close()
            stop_on_signal(run, epoch, step_in_epoch + 1)
        at_interval = config.checkpoint_every > 0 and run.global_step % config.checkpoint_every == 0
        if at_interval and step_in_epoch + 1 < len(batches):
            run.checkpoint(epoch, step_in_epoch + 1)
    bar.close()
    run.speed.end_epoch(stats.images * ctx.world_size, time.perf_counter() - stats.started)
    return stats


def time_left(run: Run, steps_this_epoch: int, seconds_this_epoch: float) -> float:
    """Seconds of training left: what remains of ``--time-budget``, else the steps left at this epoch's pace."""
    if run.clock.budget is not None:
        return max(0.0, run.budget_left())
    return (run.total_steps - run.global_step) * seconds_this_epoch / max(1, steps_this_epoch)


def drop_failures(run: Run, indices: torch.Tensor, images: torch.Tensor, errors: list[str], paired: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Streaming: files that failed to decode now are skipped from here on and left out of this batch.

    ``paired``: the batch holds the images, then as many neighbour partners; an image that failed is left out
    with its partner, and a partner that failed is replaced by its image. Returns (images, partners or None).
    """
    from tqdm import tqdm

    partners = None
    if paired:
        half = len(errors) // 2
        partner_errors = errors[half:]
        indices, errors, partners, images = indices[:half], errors[:half], images[half:], images[:half]
        if any(partner_errors):
            failed = torch.tensor([bool(e) for e in partner_errors]).view(-1, 1, 1, 1)
            partners = torch.where(failed, images, partners)
    new_failures = {int(i): e for i, e in zip(indices.tolist(), errors, strict=True) if e}
    if not new_failures:
        return images, partners
    for index, reason in new_failures.items():
        if index not in run.skipped and run.ctx.is_main:
            tqdm.write(f"warning: skipping {run.files[index]}: {reason}", file=sys.stderr)
    run.skipped.update(new_failures)
    keep = torch.tensor([not e for e in errors])
    return images[keep], None if partners is None else partners[keep]


def stop_on_signal(run: Run, epoch: int, step_in_epoch: int) -> None:
    """SIGTERM/SIGINT: save where the run stands, say how to continue, and exit with 128 + the signal."""
    run.checkpoint(epoch, step_in_epoch)
    number = run.stop.signal_number or signal.SIGTERM
    if run.ctx.is_main:
        write_skipped(run.out / "skipped.txt", run.files, run.skipped, run.unreadable)
        print(f"\n{signal.Signals(number).name}: checkpoint saved at epoch {epoch + 1}, step {step_in_epoch}; "
              f"continue with: twist train {run.config.data} --out {run.out} --resume", file=sys.stderr)
    raise SystemExit(128 + number)


def end_epoch(run: Run, epoch: int, stats: EpochStats) -> dict[str, Any]:
    """Merge the ranks' statistics, refit the budget, evaluate when due, then checkpoint and log the epoch."""
    from tqdm import tqdm

    config, ctx = run.config, run.ctx
    merged_skips: dict[int, str] = {}
    for part in distributed.all_gather_objects(ctx, run.skipped):
        merged_skips.update(part)
    run.skipped = merged_skips
    summary = stats.merged(ctx)
    # Files that failed only now (streaming) shorten the epochs to come; the epoch count stays as asked.
    run.steps_per_epoch = max(1, (len(run.files) - len(run.skipped)) // (run.batch_size * ctx.world_size))
    metrics = {"epoch": epoch + 1, "step": run.global_step, **summary, "skipped": len(run.skipped),
               "run_seconds": run.run_seconds()}
    if run.clock.budget is None or run.global_step < run.total_steps:
        run.fit_length(epoch + 1)
    finished = run.global_step >= run.total_steps
    schedule = run.schedule()
    # The score just before the self-labelling stage, to show what the stage changes: the next epoch enters it.
    stage_next = not schedule.at(run.global_step - 1).self_labelling and \
        schedule.at(run.global_step + run.steps_per_epoch - 1).self_labelling
    if finished or (config.eval_data and ((epoch + 1) % config.eval_every == 0 or stage_next)):
        began = time.perf_counter()
        metrics["eval"] = run.calibrate_and_evaluate(epoch + 1)
        run.clock.eval_seconds_in_loop += time.perf_counter() - began
        if metrics["eval"] is None:
            metrics.pop("eval")
    run.history.append(metrics)
    run.checkpoint(epoch + 1, 0)  # first the checkpoint, which carries the history, then the file rebuilt from it
    if ctx.is_main:
        write_metrics(run.out / METRICS_NAME, run.history)
        write_skipped(run.out / "skipped.txt", run.files, run.skipped, run.unreadable)
        if run.global_step > schedule.warmup_end and metrics["clusters_in_use"] < config.classes / 2:
            tqdm.write(f"warning: only {metrics['clusters_in_use']} of {config.classes} clusters in use after "
                       "warm-up: the model may be collapsing (check --lam2, --tau, --lr, or use a smaller K)",
                       file=sys.stderr)
    return metrics


def _readable(path: Path, max_pixels: int) -> bool:
    try:
        decode_image(path, max_pixels)
        return True
    except Exception:
        return False


def _cache_batches(cache: torch.Tensor, batches: list[list[int]]):
    for batch in batches:
        indices = torch.tensor(batch)
        yield indices, cache[indices], [""] * len(batch)
