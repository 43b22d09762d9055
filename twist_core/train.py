"""Train TWIST on an unlabeled image folder, in one process or under torchrun.

Read top to bottom: configure, find and decode images, build model/optimiser, maybe resume, then the epoch
loop (augment -> forward -> loss -> step), checkpointing every epoch, every N steps, and on SIGTERM/SIGINT.
Run with ``twist train DATA --out RUN`` or ``torchrun --nproc_per_node N -m twist_core.train DATA --out RUN``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from twist_core import distributed
from twist_core.augment import BatchAugment, policy_for_size
from twist_core.budget import fit_total_steps, parse_duration
from twist_core.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint
from twist_core.config import build_config, command_parser, option, save_config
from twist_core.dataset import EpochBatches, FolderImages, decode_all, decode_size, epoch_batches, make_loader
from twist_core.evaluate import load_eval_images, normalise, predict_torch, score, summary_line
from twist_core.folder import DEFAULT_MAX_PIXELS, NoImagesError, decode_image, require_images
from twist_core.init_weights import InitError, InitWeights, check_fits, load_into, read_init
from twist_core.io_utils import atomic_write_text, mark_output_folder
from twist_core.loss import self_label_loss, twist_multicrop_loss
from twist_core.model import ModelSpec, TwistModel, recalibrate_batchnorm
from twist_core.optim import Schedule, build_optimizer
from twist_core.patches import PatchBackbone, learn_patch_dictionary

METRICS_NAME = "metrics.jsonl"
RECALIBRATION_IMAGES = 10_000  # clean images whose BN statistics the exported model uses
DICTIONARY_PIXELS = 32 * 1024**2  # the patch dictionary is fitted on at most this many decoded pixels (10,000 at 32 px)
# Patches recipe, from 5-minute runs on cifar10-test (2-core CPU, ACC): 128/256/400 atoms, tau 0.5/1.0, MLP
# 2048/1024 -> 256 atoms, tau 1.0, MLP 1024 (0.44; tau 0.5: 0.33, 400 atoms: 0.36 at half the speed).
PATCH_ATOMS = 256
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "lars": 1.5e-6, "adamw": 0.05}
# Per 256 images. LARS: the paper's 0.5; AdamW: DINO's 5e-4 (0.1 makes AdamW diverge); SGD: calibrated here.
DEFAULT_LR = {"sgd": 0.1, "lars": 0.5, "adamw": 5e-4}


@dataclass
class TrainConfig:
    data: str = option(None, "folder of images (searched recursively; folder names are never used as labels)")
    out: str = option("runs/twist", "run folder for config.json, metrics.jsonl, skipped.txt, checkpoints, curves.png")
    classes: int = option(10, "K, the number of classes to discover")
    recipe: str = option("default", "default: settings for one GPU or a CPU within a time budget; paper: the "
                                    "paper's ImageNet settings (ResNet-50, MLP 4096, tau 1, LARS lr 0.5 per 256, "
                                    "weight decay 1.5e-6, 12 local crops, 800 + 50 epochs) for every option left at "
                                    "its default", choices=["default", "paper"])
    backbone: str = option("auto", "auto: patches for small images (<= 64 px) on a CPU, else resnet18. A ResNet "
                                   "trains a representation (the exported embedding is its pooled feature); patches "
                                   "trains only a head on fixed features, a frozen patch dictionary fitted on the "
                                   "folder (fast on CPU; the embedding is the head's first hidden layer)",
                           choices=["auto", "patches", "resnet18", "resnet34", "resnet50"])
    width: int = option(0, "patches: dictionary atoms; ResNet: channels of the first stage (64 = torchvision); "
                           "0 = auto: 256 atoms, or 64 channels on GPU and 16 on CPU")
    image_size: int = option(0, "training crop size in px; 0 = auto from the median image size (32/64 or 224)")
    small_stem: bool | None = option(None, "3x3 stride-1 stem without max-pool for small images; default: size <= 64")
    hidden_dim: int = option(0, "width of the projection MLP; 0 = auto: 1024 for patches, 2048 for ResNet")
    local_crops: int = option(0, "number of extra small local crops per image (multi-crop)")
    epochs: int = option(100, "training epochs")
    batch_size: int = option(0, "images per process per step (global batch = this x processes); 0 = auto: "
                                "256, or less for small folders so that an epoch has at least 16 steps")
    optimizer: str = option("sgd", "optimiser (SGD with Nesterov trained best in short runs here)",
                            choices=["sgd", "lars", "adamw"])
    lr: float | None = option(None, "base learning rate per 256 images, scaled by global batch / 256; default per "
                                    "optimiser: sgd 0.1, lars 0.5 (the paper), adamw 5e-4")
    weight_decay: float | None = option(None, "weight decay; default per optimiser: sgd 5e-4, lars 1.5e-6, adamw 0.05")
    momentum: float = option(0.9, "momentum (SGD, LARS)")
    lars_eta: float = option(0.001, "LARS trust coefficient")
    warmup_epochs: float = option(5.0, "linear warm-up length in epochs before the cosine decay")
    tau: float = option(0.0, "softmax temperature of the sharpness/diversity terms and of exported probabilities; "
                             "0 = auto: 1.0 for patches, 0.5 for ResNet")
    lam1: float = option(0.0, "sharpness weight is (1 + lam1)")
    lam2: float = option(1.0, "diversity weight (the term that prevents collapse)")
    self_label_fraction: float = option(0.1, "share of the final steps spent in the self-labelling stage, which "
                                             "replaces the TWIST loss with confident pseudo-labels and restarts the "
                                             "learning rate at 10%% of the peak (0 = off)")
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
    workers: int = option(-1, "decoding worker processes; -1 = auto (CPU count, at most 8)")
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
}


def apply_recipe(config: TrainConfig) -> TrainConfig:
    """``--recipe paper``: the paper's values for every option still at its default (explicit options win)."""
    if config.recipe != "paper":
        return config
    defaults = TrainConfig()
    return dataclasses.replace(config, **{name: value for name, value in PAPER_RECIPE.items()
                                          if getattr(config, name) == getattr(defaults, name)})


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


class ResumeError(RuntimeError):
    """``--resume`` cannot continue this run as asked."""


class ConfigError(ValueError):
    """Options that contradict each other."""


class StopRequested:
    """Remembers SIGTERM/SIGINT so the loop can save a checkpoint and exit at the end of the step."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    def __call__(self, signum: int, _frame: Any) -> None:
        self.signal_number = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequested]:
        """Catch SIGTERM/SIGINT while the body runs, then put back whatever handled them before.

        Restoring matters to callers that go on after training: ``twist demo`` serves its app afterwards,
        and with this handler left in place Ctrl-C would be remembered and ignored.
        """
        previous = {number: signal.signal(number, self) for number in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


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
    if config.image_size <= 0:
        side = median_image_side(root, files, config.max_pixels)
        changes["image_size"] = 16 if side <= 24 else 32 if side <= 40 else 64 if side <= 96 else 224
    size = changes.get("image_size", config.image_size)
    if config.small_stem is None:
        changes["small_stem"] = size <= 64
    backbone = config.backbone
    if backbone == "auto":
        backbone = changes["backbone"] = "patches" if size <= 64 and device.type != "cuda" else "resnet18"
    if backbone == "patches" and config.init:
        raise ConfigError("--init loads ResNet weights; the patches backbone has none: add --backbone resnet18 "
                          "(or resnet34/resnet50, as the weights are)")
    patches = backbone == "patches"
    if config.width <= 0:
        changes["width"] = PATCH_ATOMS if patches else 64 if device.type == "cuda" else 16
    if config.hidden_dim <= 0:
        changes["hidden_dim"] = 1024 if patches else 2048
    if config.tau <= 0:
        changes["tau"] = 1.0 if patches else 0.5
    if config.weight_decay is None:
        changes["weight_decay"] = DEFAULT_WEIGHT_DECAY[config.optimizer]
    if config.lr is None:
        changes["lr"] = DEFAULT_LR[config.optimizer]
    if config.workers < 0:
        changes["workers"] = min(8, os.cpu_count() or 1)
    if config.precision == "auto":
        changes["precision"] = "bf16" if device.type == "cuda" else "fp32"
    return dataclasses.replace(config, **changes)


def follow_init(config: TrainConfig, init: InitWeights) -> TrainConfig:
    """What ``--init`` decides: architecture, width and stem of its weights, and the head's width when K matches.

    Explicit options that contradict the weights stop the run here, before anything is written.
    """
    if config.backbone == "patches":
        raise ConfigError("--init loads ResNet weights; the patches backbone has none: add --backbone resnet18 "
                          "(or resnet34/resnet50, as the weights are)")
    changes: dict[str, Any] = {"init_sha256": init.sha256}
    for name, value in (("backbone", init.architecture), ("width", init.width)):
        given = getattr(config, name)
        if given in ("auto", 0):
            changes[name] = value
        elif given != value:
            raise ConfigError(f"--init {config.init} holds a {init.architecture} of width {init.width}: "
                              f"--{name} {given} cannot take it (leave --{name} out to follow the weights)")
    if config.small_stem is None:
        changes["small_stem"] = init.small_stem
    if init.head_shape and init.head_shape[1] == config.classes and config.hidden_dim <= 0:
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


def forward_views(model: nn.Module, views: list[torch.Tensor], channels_last: bool) -> list[torch.Tensor]:
    """Logits of every view, split back per view, from one model call on all the crops of the step."""
    if channels_last:
        views = [view.contiguous(memory_format=torch.channels_last) for view in views]
    _, logits = model(views)
    return list(logits.float().split([view.shape[0] for view in views]))


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """``metrics.jsonl`` rewritten whole from the history the checkpoint carries, so it never runs ahead."""
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in history))


def write_skipped(path: Path, files: list[str], skipped: dict[int, str]) -> None:
    lines = [f"{files[i]}\t{reason}" for i, reason in sorted(skipped.items(), key=lambda item: files[item[0]])]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def check_options(config: TrainConfig) -> None:
    """Refuse values no run can use before anything is decoded or written."""
    if config.classes < 1:
        raise ConfigError(f"--classes {config.classes}: give the number of classes to discover, at least 2")
    if config.time_budget is not None:
        try:
            if parse_duration(config.time_budget) <= 0:
                raise ValueError(f"--time-budget {config.time_budget!r} leaves no time to train")
        except ValueError as error:
            raise ConfigError(f"--time-budget: {error}") from None
    for name in ("epochs", "eval_every"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(config, name)}: must be at least 1")


def warn_about_classes(classes: int, n_images: int) -> None:
    """K = 1 has nothing to learn, and a K above the image count leaves clusters empty; both still run."""
    if classes == 1:
        print("warning: --classes 1 puts every image in one cluster: the diversity term is zero and nothing is "
              "learned; use --classes 2 or more", file=sys.stderr)
    elif classes > n_images:
        print(f"warning: --classes {classes} is more than the {n_images} readable images: at least "
              f"{classes - n_images} clusters will stay empty", file=sys.stderr)


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns the final epoch's metrics."""
    check_options(config)
    config = apply_recipe(config)
    with distributed.process_group(config.device) as ctx, contextlib.ExitStack() as cleanup:
        return _train(config, ctx, cleanup)


def _train(config: TrainConfig, ctx: distributed.Context, cleanup: contextlib.ExitStack) -> dict[str, Any]:
    from tqdm import tqdm

    started = time.perf_counter()
    out = Path(config.out)
    root = Path(config.data)
    checkpoint_path = out / CHECKPOINT_NAME
    files = require_images(root)

    resumed: dict[str, Any] | None = None
    if not config.resume and checkpoint_path.exists():
        # Metrics alone are no run: they are rewritten from the checkpoint, so a run killed before its
        # first checkpoint simply starts again.
        raise ResumeError(f"{out} already holds a run ({CHECKPOINT_NAME}): add --resume to continue it, or choose "
                          "another --out (nothing was changed)")
    if config.resume:
        if not checkpoint_path.exists():
            raise ResumeError(f"--resume: no checkpoint at {checkpoint_path} (the run stopped before its first "
                              "checkpoint): start it again without --resume")
        resumed = load_checkpoint(checkpoint_path)
        saved = resumed["config"]
        # The saved run defines everything; only where to run it may change.
        keep = {"device", "workers", "progress", "resume", "checkpoint_every", "eval_data", "eval_every"}
        known = {field.name for field in dataclasses.fields(TrainConfig)}  # options of older versions dropped
        config = TrainConfig(**{**{k: v for k, v in saved.items() if k in known},
                                **{k: getattr(config, k) for k in keep}})
        if resumed["files"] != files:
            raise ResumeError(f"{root} changed since the run started ({len(resumed['files'])} files then, "
                               f"{len(files)} now): start a new run instead of --resume")
    init = None
    if config.init and not resumed:
        init = read_init(config.init)
        config = follow_init(config, init)
    config = resolve_auto(config, root, files, ctx.device)
    torch.manual_seed(config.seed)

    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        mark_output_folder(out)

    # Data: decode every image once into RAM when it fits, else stream through worker processes.
    size = decode_size(config.image_size)
    dataset = FolderImages(root, files, size, config.max_pixels)
    cache_bytes = len(files) * 3 * size * size
    use_cache = config.cache == "ram" or (config.cache == "auto" and cache_bytes < 2 * 1024**3)
    skipped: dict[int, str] = dict(resumed["skipped"]) if resumed else {}
    cache = None
    if use_cache:
        cache, failures = decode_all(dataset, config.workers, progress=config.progress and ctx.is_main)
        skipped.update(failures)
    elif not any(_readable(root / f, config.max_pixels) for f in files):
        raise NoImagesError(f"none of the {len(files)} image files in {root} could be decoded")
    n_valid = len(files) - len(skipped)
    if n_valid == 0:
        raise NoImagesError(f"none of the {len(files)} image files in {root} could be decoded; see the reasons in "
                            f"{out / 'skipped.txt'}")
    if ctx.is_main:
        write_skipped(out / "skipped.txt", files, skipped)
        for index, reason in sorted(skipped.items()):
            print(f"warning: skipping {files[index]}: {reason}", file=sys.stderr)
        warn_about_classes(config.classes, n_valid)

    if config.batch_size <= 0:
        config = dataclasses.replace(config, batch_size=auto_batch_size(n_valid, ctx.world_size))
    batch_size = config.batch_size
    if n_valid < batch_size * ctx.world_size:
        batch_size = max(2, n_valid // ctx.world_size)
        if ctx.is_main:
            print(f"warning: only {n_valid} readable images: batch size lowered to {batch_size} per process",
                  file=sys.stderr)
    if ctx.is_main:
        save_config(config, out / "config.json")

    def spread_images(limit: int) -> list[int]:
        """Up to ``limit`` readable training images, evenly spread over the folder."""
        valid = [i for i in range(len(files)) if i not in skipped]
        return valid[::max(1, len(valid) // limit)][:limit]

    def uint8_batches(chosen: list[int]):
        """The decoded images ``chosen`` (from the cache, or decoded now), in batches, failures left out."""
        if cache is not None:
            yield from (cache[chosen[i:i + batch_size]] for i in range(0, len(chosen), batch_size))
            return
        loader = DataLoader(Subset(dataset, chosen), batch_size=batch_size, num_workers=config.workers)
        yield from (images[torch.tensor([not e for e in errors])] for _, images, errors in loader)

    def decoded_batches(batches: list[list[int]]) -> Iterator[torch.Tensor]:
        """These batches from the cache or decoded now; a file that fails now is replaced by a good image of its
        batch, so every batch keeps its size (ranks stay in lockstep)."""
        if cache is not None:
            yield from (cache[torch.tensor(indices)] for indices in batches)
            return
        for _, images, errors in DataLoader(dataset, batch_sampler=batches, num_workers=config.workers):
            good = [k for k, error in enumerate(errors) if not error] or list(range(len(errors)))
            yield images[torch.tensor([k if not errors[k] else good[k % len(good)] for k in range(len(errors))])]

    def clean_batches():
        """Centre crops of up to RECALIBRATION_IMAGES training images, evenly spread, in this rank's share of a
        pass plan that makes every rank run the same number of batches of 2 or more images."""
        chosen = spread_images(RECALIBRATION_IMAGES)
        plan = distributed.pass_plan(len(chosen), ctx.world_size, batch_size)
        for images in decoded_batches(plan.batches(chosen, ctx.rank, ctx.world_size)):
            batch = normalise(images.to(ctx.device), config.image_size)
            yield batch.contiguous(memory_format=torch.channels_last) if config.channels_last else batch

    steps_per_epoch = resumed["steps_per_epoch"] if resumed else max(1, n_valid // (batch_size * ctx.world_size))
    total_steps = resumed["total_steps"] if resumed else steps_per_epoch * config.epochs
    budget = parse_duration(config.time_budget) if config.time_budget else None
    prior_seconds = resumed["train_seconds"] if resumed else 0.0
    peak_lr = config.lr * batch_size * ctx.world_size / 256

    spec = ModelSpec(backbone=config.backbone, width=config.width, small_stem=bool(config.small_stem),
                     hidden_dim=config.hidden_dim, n_classes=config.classes, tau=config.tau)
    model = TwistModel(spec)
    if init is not None:
        head_loaded = load_into(model, init)
        if ctx.is_main:
            print(f"--init: {len(init.backbone)} backbone tensors from {init.file}"
                  f"{' and the head' if head_loaded else ''} (sha256 {init.sha256[:12]})", file=sys.stderr)
    if resumed:
        model.load_state_dict(resumed["model"])
    elif isinstance(model.backbone, PatchBackbone):
        # Every rank fits the same dictionary from the same images; DDP would broadcast rank 0's anyway.
        sample = torch.cat(list(uint8_batches(spread_images(max(100, DICTIONARY_PIXELS // (3 * size * size))))))
        if ctx.is_main and config.progress:
            print(f"fitting the patch dictionary ({config.width} atoms) on {len(sample)} images", file=sys.stderr)
        model.backbone.stem.load_dictionary(learn_patch_dictionary(sample, config.width, seed=config.seed))
    if ctx.device.type == "cuda" and ctx.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(ctx.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config.optimizer, model, peak_lr, float(config.weight_decay or 0.0),
                                config.momentum, config.lars_eta)
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

    augment = BatchAugment(policy_for_size(config.image_size, config.local_crops))
    augment_self_label = BatchAugment(policy_for_size(config.image_size, config.local_crops, self_labelling=True))
    start_epoch = resumed["epoch"] if resumed else 0  # epochs completed
    start_step_in_epoch = resumed["step_in_epoch"] if resumed else 0
    global_step = resumed["global_step"] if resumed else 0
    history: list[dict[str, Any]] = resumed["history"] if resumed else []

    sampler = EpochBatches()
    loader = None if cache is not None else make_loader(dataset, sampler, config.workers,
                                                        ctx.device.type == "cuda")
    stop = cleanup.enter_context(StopRequested().installed())

    eval_data = None
    if config.eval_data and ctx.is_main:
        eval_data = load_eval_images(config.eval_data, config.image_size, config.workers, config.max_pixels,
                                     progress=config.progress)
    eval_seconds = 0.0


    def calibrate_and_evaluate(epoch: int) -> dict[str, float] | None:
        """Fresh BN statistics on clean images (all ranks), then rank 0 scores the eval set if there is one."""
        nonlocal eval_seconds
        began = time.perf_counter()
        with autocast(config.precision, ctx.device):
            recalibrate_batchnorm(model, clean_batches())
        if eval_data is None:
            return None
        probs, embeddings = predict_torch(model, eval_data.images, config.image_size, ctx.device)
        report = score(probs, embeddings, eval_data)
        eval_seconds = time.perf_counter() - began
        summary = {name: report[name] for name in ("acc", "nmi", "ami", "ari", "knn_acc", "clusters_in_use")}
        if config.progress:
            tqdm.write(f"eval after epoch {epoch}: {summary_line(report)}", file=sys.stderr)
        return summary

    def run_seconds() -> float:
        return prior_seconds + time.perf_counter() - started

    def checkpoint(epoch: int, step_in_epoch: int) -> None:
        if not ctx.is_main:
            return
        save_checkpoint(checkpoint_path, {
            "format": 1, "config": dataclasses.asdict(config), "model_spec": dataclasses.asdict(spec),
            "model": plain_state_dict(model), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step, "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "train_seconds": run_seconds(), "skipped": dict(skipped), "files": files, "history": history,
        })

    if config.eval_data and not resumed:
        history.append({"epoch": 0, "step": 0, "eval": calibrate_and_evaluate(0)})
    if ctx.is_main:
        write_metrics(out / METRICS_NAME, history)  # on resume: whatever ran past the checkpoint is dropped

    # Step timing for --time-budget: this session's loop time without evaluations, after two warm-up steps.
    timed_steps, timed_since, eval_time_in_loop = 0, None, 0.0

    def refit_budget() -> None:
        nonlocal total_steps
        if budget is None or timed_since is None or timed_steps == 0:
            return
        seconds_per_step = (time.perf_counter() - timed_since - eval_time_in_loop) / timed_steps
        reserve = 0.01 * budget + 2.0  # final checkpoint, plot, process exit
        fitted = fit_total_steps(global_step, seconds_per_step, budget - run_seconds() - reserve, steps_per_epoch,
                                 eval_seconds, config.eval_every)
        total_steps = distributed.broadcast_int(ctx, max(fitted, global_step, 1))

    def schedule() -> Schedule:
        return Schedule(total_steps, round(config.warmup_epochs * steps_per_epoch), peak_lr,
                        config.self_label_fraction, config.self_label_keep)

    metrics: dict[str, Any] = history[-1] if history else {}
    lr = 0.0
    epoch = start_epoch
    while global_step < total_steps:
        batches = epoch_batches(len(files), batch_size, epoch, config.seed, ctx.rank, ctx.world_size,
                                exclude=set(skipped))
        first_step = start_step_in_epoch if epoch == start_epoch else 0
        sampler.batches = batches[first_step:]
        train_model.train()
        sums = {name: 0.0 for name in ("loss", "consistency", "sharpness", "diversity", "self_label")}
        cluster_counts = torch.zeros(config.classes, dtype=torch.float64)
        mean_probs = torch.zeros(config.classes, dtype=torch.float64)
        seen, steps_done, self_label_steps, epoch_start = 0, 0, 0, time.perf_counter()
        source = (_cache_batches(cache, sampler.batches) if cache is not None else iter(loader))
        n_epochs = math.ceil(total_steps / steps_per_epoch)
        bar = tqdm(total=len(batches), initial=first_step, desc=f"epoch {epoch + 1}/{n_epochs}",
                   unit="step", disable=not (config.progress and ctx.is_main), dynamic_ncols=True)
        for step_in_epoch, (indices, images, errors) in enumerate(source, start=first_step):
            if global_step >= total_steps:
                break
            new_failures = {int(i): e for i, e in zip(indices.tolist(), errors, strict=True) if e}
            if new_failures:
                for index, reason in new_failures.items():
                    if index not in skipped and ctx.is_main:
                        tqdm.write(f"warning: skipping {files[index]}: {reason}", file=sys.stderr)
                skipped.update(new_failures)
                keep = torch.tensor([not e for e in errors])
                images = images[keep]
            plan = schedule().at(global_step)
            lr = plan.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(ctx.device, non_blocking=True)
            generator = torch.Generator(device=ctx.device).manual_seed(
                config.seed * 1_000_003 + global_step * 1009 + ctx.rank)
            views = (augment_self_label if plan.self_labelling else augment)(images, generator)
            with autocast(config.precision, ctx.device):
                view_logits = forward_views(train_model, views, config.channels_last)
            if plan.self_labelling:  # the stage's cross-entropy replaces the TWIST loss, still logged as "loss"
                with torch.no_grad():
                    parts = twist_multicrop_loss(view_logits, 2, config.tau, config.lam1, config.lam2)
                loss = parts["self_label"] = self_label_loss(view_logits, 2, config.tau, plan.keep)
                self_label_steps += 1
            else:
                parts = twist_multicrop_loss(view_logits, 2, config.tau, config.lam1, config.lam2)
                loss = parts["loss"]
            if distributed.any_rank(ctx, not bool(torch.isfinite(loss))):
                raise TrainingDiverged(
                    f"the loss became {loss.item()} at epoch {epoch + 1}, step {step_in_epoch + 1}: training stopped. "
                    f"The last good checkpoint ({checkpoint_path}) is intact; try a lower --lr or --precision fp32, "
                    "then --resume or start again.")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            global_step += 1
            steps_done += 1

            with torch.no_grad():
                probs = torch.softmax(view_logits[0].detach() / config.tau, -1).double().cpu()
                cluster_counts += torch.bincount(probs.argmax(1), minlength=config.classes).double()
                mean_probs += probs.sum(0)
            seen += images.shape[0] * ctx.world_size
            values = {name: value.detach().item() for name, value in parts.items()}
            for name, value in values.items():
                sums[name] += value
            elapsed = time.perf_counter() - epoch_start
            bar.set_postfix(loss=f"{loss.detach().item():.3f}", kl=f"{values['consistency']:.3f}",
                            sharp=f"{values['sharpness']:.3f}", div=f"{values['diversity']:.3f}",
                            img_s=f"{seen / max(elapsed, 1e-9):.0f}", refresh=False)
            bar.update(1)
            if timed_since is None and steps_done == 2:
                timed_since = time.perf_counter()
            elif timed_since is not None:
                timed_steps += 1
                if timed_steps % 10 == 0:  # small, frequent corrections keep every stage of the schedule
                    refit_budget()

            at_interval = config.checkpoint_every > 0 and global_step % config.checkpoint_every == 0
            if distributed.any_rank(ctx, stop.signal_number is not None):
                checkpoint(epoch, step_in_epoch + 1)
                bar.close()
                name = signal.Signals(stop.signal_number or signal.SIGTERM).name
                if ctx.is_main:
                    write_skipped(out / "skipped.txt", files, skipped)
                    print(f"\n{name}: checkpoint saved at epoch {epoch + 1}, step {step_in_epoch + 1}; "
                          f"continue with: twist train {root} --out {out} --resume", file=sys.stderr)
                raise SystemExit(128 + (stop.signal_number or signal.SIGTERM))
            if at_interval and step_in_epoch + 1 < len(batches):
                checkpoint(epoch, step_in_epoch + 1)
        bar.close()

        # Epoch summary over all processes.
        merged_skips: dict[int, str] = {}
        for part in distributed.all_gather_objects(ctx, skipped):
            merged_skips.update(part)
        skipped = merged_skips
        totals = distributed.sum_across(ctx, torch.tensor([*sums.values(), float(steps_done)], dtype=torch.float64))
        counts = distributed.sum_across(ctx, cluster_counts).cpu()
        mean = distributed.sum_across(ctx, mean_probs).cpu()
        mean = mean / mean.sum().clamp(min=1e-12)
        n_steps = max(1.0, float(totals[-1]))
        # Files that failed only now (streaming) shorten the epochs to come; the epoch count stays as asked.
        steps_per_epoch = max(1, (len(files) - len(skipped)) // (batch_size * ctx.world_size))
        if budget is None:
            total_steps = global_step + (config.epochs - epoch - 1) * steps_per_epoch
        elapsed = time.perf_counter() - epoch_start
        metrics = {"epoch": epoch + 1, "step": global_step, "lr": lr,
                   **{name: float(totals[i]) / n_steps for i, name in enumerate(sums)},
                   "images_per_s": seen / max(elapsed, 1e-9), "clusters_in_use": int((counts > 0).sum()),
                   "mean_entropy": float(-(mean * torch.log(mean + 1e-12)).sum()),
                   "max_entropy": math.log(config.classes), "self_labelling": self_label_steps > 0,
                   "skipped": len(skipped), "seconds": elapsed, "run_seconds": run_seconds()}
        if self_label_steps == 0:
            metrics.pop("self_label")
        else:
            metrics["self_label"] = float(totals[4]) / self_label_steps
        if global_step < total_steps:
            refit_budget()
        finished = global_step >= total_steps
        stage_next = not schedule().at(global_step - 1).self_labelling and schedule().at(global_step).self_labelling
        if finished or (config.eval_data and ((epoch + 1) % config.eval_every == 0 or stage_next)):
            began = time.perf_counter()
            metrics["eval"] = calibrate_and_evaluate(epoch + 1)
            eval_time_in_loop += time.perf_counter() - began
            if metrics["eval"] is None:
                metrics.pop("eval")
        history.append(metrics)
        epoch += 1
        checkpoint(epoch, 0)  # first the checkpoint, which carries the history, then the file rebuilt from it
        if ctx.is_main:
            write_metrics(out / METRICS_NAME, history)
        if ctx.is_main:
            write_skipped(out / "skipped.txt", files, skipped)
            warmup_done = global_step > schedule().warmup_end
            if warmup_done and metrics["clusters_in_use"] < config.classes / 2:
                tqdm.write(f"warning: only {metrics['clusters_in_use']} of {config.classes} clusters in use after "
                           "warm-up: the model may be collapsing (check --lam2, --tau, --lr, or use a smaller K)",
                           file=sys.stderr)
    if ctx.is_main:
        from twist_core.plots import plot_training_curves

        plot_training_curves(history, out / "curves.png")
        atomic_write_text(out / "DONE", json.dumps(metrics) + "\n")
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


def build_parser() -> argparse.ArgumentParser:
    return command_parser("twist train", __doc__, TrainConfig, positional=("data",))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = build_config(TrainConfig, args, args.config)
    if not config.data and not config.resume:
        raise SystemExit("twist train: give the image folder (DATA)")
    if config.resume and not config.data:
        saved = json.loads((Path(config.out) / "config.json").read_text())
        config = dataclasses.replace(config, data=saved["data"])
    try:
        train(config)
    except (ConfigError, CheckpointError, InitError) as error:  # the user's options or files: fix them and run again
        print(f"twist train: error: {error}", file=sys.stderr)
        return 2
    except (NoImagesError, TrainingDiverged, ResumeError) as error:
        print(f"twist train: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
