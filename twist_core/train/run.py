"""A training run's state and set-up: the folder checked, the images decoded, the model and optimiser
built, a checkpoint resumed, and what the checkpoint holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
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
from twist_core.config import AUTO, save_config
from twist_core.data.augment import BatchAugment, policy_for_size
from twist_core.data.dataset import EpochBatches, FolderImages, decode_per_node, make_loader
from twist_core.data.folder import NoImagesError, decode_image, require_images, skipped_lines
from twist_core.data.preprocess import centre_crop_normalise, decode_size
from twist_core.errors import UserError
from twist_core.evaluation.evaluate import load_eval_images, predict_torch, score, summary_line
from twist_core.io_utils import atomic_write_text, mark_output_folder
from twist_core.layout import CHECKPOINT_FILE, CONFIG_FILE, SKIPPED_FILE
from twist_core.model.checkpoint import load_checkpoint, save_checkpoint
from twist_core.model.init_weights import InitWeights, load_into, read_init
from twist_core.model.network import ModelSpec, TwistModel, recalibrate_batchnorm
from twist_core.model.patches import PatchBackbone, learn_patch_dictionary
from twist_core.stop_signals import StopRequested
from twist_core.train.budget import fit_total_steps, parse_duration
from twist_core.train.loss import TwistObjective
from twist_core.train.neighbours import broadcast_buffers, draw_partners, mine
from twist_core.train.optim import Schedule, build_optimizer
from twist_core.train.options import (
    ABSENT_FROM_OLDER_RUNS,
    ResolvedTrainConfig,
    TrainConfig,
    auto_batch_size,
    follow_init,
    median_image_side,
    parse_coarse_classes,
    resolve_auto,
    warn_about_classes,
)
from twist_core.train.photo_defaults import announcement, expected_speed
from twist_core.train.speed import SpeedWatch

RECALIBRATION_IMAGES = 10_000  # clean images whose BN statistics the exported model uses
DICTIONARY_PIXELS = 32 * 1024**2  # the patch dictionary is fitted on at most this many decoded pixels (10,000 at 32 px)


class ResumeError(UserError, RuntimeError):
    """``--resume`` cannot continue this run as asked."""


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

    config: ResolvedTrainConfig
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
        self.objective = TwistObjective(self.config.tau, self.config.lam1, self.config.lam2)
        self.augment = BatchAugment(policy())
        self.augment_self_label = BatchAugment(policy(self_labelling=True))
        self.sampler = EpochBatches()
        self.loader = None if self.cache is not None else make_loader(
            self.dataset, self.sampler, self.config.workers, self.ctx.device.type == "cuda")

    def supervise(self, supervision: Supervision) -> None:
        """Mix labelled images into every step, their cross-entropy weighted in the loss (``twist finetune``)."""
        self.supervision = supervision
        self.objective.supervised_weight = supervision.weight

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    def schedule(self) -> Schedule:
        """The schedule for the current total step count (a time budget refits it while training)."""
        return Schedule(self.total_steps, round(self.config.warmup_epochs * self.steps_per_epoch),
                        peak_lr(self.config, self.batch_size, self.ctx.world_size),
                        self.config.self_label_fraction, self.config.self_label_keep,
                        neighbour_fraction=self.config.neighbour_fraction)

    def count_steps_per_epoch(self) -> None:
        """Files that failed only now (streaming) shorten the epochs to come; the epoch count stays as asked."""
        global_batch = self.batch_size * self.ctx.world_size
        self.steps_per_epoch = steps_per_epoch(len(self.files) - len(self.skipped), global_batch)

    def run_seconds(self) -> float:
        return self.prior_seconds + time.perf_counter() - self.started

    def checkpoint(self, epoch: int, step_in_epoch: int) -> None:
        if not self.ctx.is_main:
            return
        save_checkpoint(self.out / CHECKPOINT_FILE, {
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
        set of passes that makes every rank run the same number of batches of 2 or more images."""
        chosen = self.spread_images(RECALIBRATION_IMAGES)
        passes = distributed.even_passes(len(chosen), self.ctx.world_size, self.batch_size)
        for images in self.decoded_batches(passes.batches(chosen, self.ctx.rank, self.ctx.world_size)):
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
        return draw_partners(self.neighbours, batches, config.neighbour_share, generator)

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
        source = (cache_batches(self.cache, batches) if self.cache is not None else
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
        write_skipped(out / SKIPPED_FILE, files, skipped, unreadable)
        for folder, reason in sorted(unreadable.items()):
            print(f"warning: skipping folder {folder}/: {reason}", file=sys.stderr)
        for index, reason in sorted(skipped.items()):
            print(f"warning: skipping {files[index]}: {reason}", file=sys.stderr)
        warn_about_classes(config.classes, n_valid)
    config, batch_size = fitted_batch_size(config, ctx, n_valid)
    if ctx.is_main:
        save_config(config, out / CONFIG_FILE)

    spec = ModelSpec(backbone=config.backbone, width=config.width, small_stem=config.small_stem,
                     hidden_dim=config.hidden_dim, n_classes=config.classes, tau=config.tau,
                     coarse_classes=parse_coarse_classes(config.coarse_classes, config.classes),
                     overcluster=config.overcluster,
                     input_size=config.image_size, resize_size=decode_size(config.image_size))
    epoch_length = resumed["steps_per_epoch"] if resumed else steps_per_epoch(n_valid, batch_size * ctx.world_size)

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
    optimizer = build_optimizer(config.optimizer, model, peak_lr(config, batch_size, ctx.world_size),
                                config.weight_decay, config.momentum, config.lars_eta)
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
        global_step=resumed["global_step"] if resumed else 0, steps_per_epoch=epoch_length,
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


def open_run(config: TrainConfig, ctx: distributed.Context
             ) -> tuple[TrainConfig, list[str], dict[str, str], dict | None, InitWeights | None]:
    """Check the folders, load the checkpoint to resume and the ``--init`` weights, and fill every ``auto``."""
    out, root = Path(config.out), Path(config.data)
    unreadable: dict[str, str] = {}  # subfolders the scan could not open: listed in skipped.txt, never silent
    files = require_images(root, unreadable)
    resumed: dict[str, Any] | None = None
    if not config.resume and (out / CHECKPOINT_FILE).exists():
        # Metrics alone are no run: they are rewritten from the checkpoint, so a run killed before its
        # first checkpoint simply starts again.
        raise ResumeError(f"{out} already holds a run ({CHECKPOINT_FILE}): add --resume to continue it, or choose "
                          "another --out (nothing was changed)")
    if config.resume:
        if not (out / CHECKPOINT_FILE).exists():
            raise ResumeError(f"--resume: no checkpoint at {out / CHECKPOINT_FILE} (the run stopped before its first "
                              "checkpoint): start it again without --resume")
        resumed = load_checkpoint(out / CHECKPOINT_FILE)
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
    if config.init and not resumed:  # check_options refused --init with a patches backbone
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
                            f"{Path(config.out) / SKIPPED_FILE}")
    return dataset, cache


def fitted_batch_size(config: TrainConfig, ctx: distributed.Context, n_valid: int
                      ) -> tuple[ResolvedTrainConfig, int]:
    """The options resolved with the batch size (the last ``auto``: it needs the readable image count), and the
    batch size this run uses: the configured one, lowered when the folder cannot fill one global batch."""
    chosen = auto_batch_size(n_valid, ctx.world_size) if config.batch_size == AUTO else config.batch_size
    resolved = ResolvedTrainConfig(**{**dataclasses.asdict(config), "batch_size": chosen})
    batch_size = resolved.batch_size
    if n_valid < batch_size * ctx.world_size:
        batch_size = max(2, n_valid // ctx.world_size)
        if ctx.is_main:
            print(f"warning: only {n_valid} readable images: batch size lowered to {batch_size} per process",
                  file=sys.stderr)
    return resolved, batch_size


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


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def peak_lr(config: ResolvedTrainConfig, batch_size: int, world_size: int) -> float:
    """``--lr`` is per 256 images: the learning rate at the top of the schedule scales with the global batch."""
    return config.lr * batch_size * world_size / 256


def steps_per_epoch(n_valid: int, global_batch: int) -> int:
    """Full global batches in one pass over the readable images (at least one)."""
    return max(1, n_valid // global_batch)


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


def _readable(path: Path, max_pixels: int) -> bool:
    try:
        decode_image(path, max_pixels)
        return True
    except Exception:
        return False


def cache_batches(cache: torch.Tensor, batches: list[list[int]]):
    for batch in batches:
        indices = torch.tensor(batch)
        yield indices, cache[indices], [""] * len(batch)
