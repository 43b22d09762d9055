"""Train TWIST on an unlabeled image folder, in one process or under torchrun.

Read top to bottom: configure, find and decode images, build model/optimiser, maybe resume, then the epoch
loop (augment -> forward -> loss -> step), checkpointing every epoch, every N steps, and on SIGTERM/SIGINT.
Run with ``twist train DATA --out RUN`` or ``torchrun --nproc_per_node N -m twist_core.train DATA --out RUN``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from twist_core import distributed
from twist_core.data.dataset import epoch_batches
from twist_core.errors import RunFailure
from twist_core.io_utils import atomic_write_text
from twist_core.layout import CHECKPOINT_FILE, CURVES_FILE, DONE_FILE, METRICS_FILE, SKIPPED_FILE
from twist_core.train.budget import format_duration
from twist_core.train.loss import HeadLogits
from twist_core.train.optim import StepSettings
from twist_core.train.options import TrainConfig, apply_recipe, check_options
from twist_core.train.run import Run, autocast, cache_batches, setup_run, unwrap, write_metrics, write_skipped
from twist_core.train.summary import run_summary, write_run_summary


class TrainingDiverged(RunFailure, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


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
                write_metrics(run.out / METRICS_FILE, run.history)  # on resume: rows past the checkpoint dropped
            metrics: dict[str, Any] = run.history[-1] if run.history else {}
            epoch = run.start_epoch
            while run.global_step < run.total_steps:
                metrics = end_epoch(run, epoch, train_one_epoch(run, epoch))
                epoch += 1
        if ctx.is_main:
            from twist_core.train.plots import plot_training_curves

            plot_training_curves(run.history, run.out / CURVES_FILE)
            # the summary first: DONE marks a finished run, and a kill between the two must not leave one without it
            write_run_summary(run.out, run_summary(run.config, metrics, run.global_step,
                                                   run.batch_size * ctx.world_size, run.run_seconds()))
            atomic_write_text(run.out / DONE_FILE, json.dumps(metrics) + "\n")
        return metrics


def forward_views(model: nn.Module, views: list[torch.Tensor], channels_last: bool) -> HeadLogits:
    """Logits of every view, split back per view, from one model call on all the crops of the step; and the
    same for each coarse head and for the over-clustering head (one list of views per head)."""
    if channels_last:
        views = [view.contiguous(memory_format=torch.channels_last) for view in views]
    _, logits, coarse, overcluster = model(views, all_heads=True)
    sizes = [view.shape[0] for view in views]
    return HeadLogits(list(logits.float().split(sizes)), [list(head.float().split(sizes)) for head in coarse],
                      [list(head.float().split(sizes)) for head in overcluster])


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


def step_loss(run: Run, images: torch.Tensor, settings: StepSettings, partners: torch.Tensor | None = None
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
    views = (run.augment_self_label(images, generator) if settings.self_labelling
             else run.augment(images, generator, partners))
    with autocast(config.precision, ctx.device):
        logits = forward_views(run.train_model, views, config.channels_last)
    loss, parts = run.objective(logits, settings.keep if settings.self_labelling else None, targets)
    return loss, parts, logits.main


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
    source = cache_batches(run.cache, run.sampler.batches) if run.cache is not None else iter(run.loader)
    # Under a time budget the epoch count is refitted as the speed is measured: the bar shows the time left.
    total = "" if run.clock.budget is not None else f"/{math.ceil(run.total_steps / run.steps_per_epoch)}"
    bar = tqdm(total=len(batches), initial=first_step, desc=f"epoch {epoch + 1}{total}", unit="step",
               disable=not (config.progress and ctx.is_main), dynamic_ncols=True)
    for step_in_epoch, (indices, images, errors) in enumerate(source, start=first_step):
        if run.global_step >= run.total_steps:
            break
        images, partner_images = drop_failures(run, indices, images, errors, paired=partners is not None)
        settings = run.schedule().at(run.global_step)
        for group in run.optimizer.param_groups:
            group["lr"] = settings.lr
        images = images.to(ctx.device, non_blocking=True)
        if partner_images is not None and settings.neighbours:
            partner_images = partner_images.to(ctx.device, non_blocking=True)
        else:
            partner_images = None
        loss, parts, view_logits = step_loss(run, images, settings, partner_images)
        if distributed.any_rank(ctx, not bool(torch.isfinite(loss))):
            raise TrainingDiverged(
                f"the loss became {loss.item()} at epoch {epoch + 1}, step {step_in_epoch + 1}: training stopped. "
                f"The last good checkpoint ({run.out / CHECKPOINT_FILE}) is intact; try a lower --lr or --precision "
                "fp32, then --resume or start again.")
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.global_step += 1
        with torch.no_grad():
            probs = torch.softmax(view_logits[0].detach() / config.tau, -1)
        values = stats.add(parts, probs, images.shape[0], settings.lr, settings.self_labelling)
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
        write_skipped(run.out / SKIPPED_FILE, run.files, run.skipped, run.unreadable)
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
    run.count_steps_per_epoch()
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
        write_metrics(run.out / METRICS_FILE, run.history)
        write_skipped(run.out / SKIPPED_FILE, run.files, run.skipped, run.unreadable)
        if run.global_step > schedule.warmup_end and metrics["clusters_in_use"] < config.classes / 2:
            tqdm.write(f"warning: only {metrics['clusters_in_use']} of {config.classes} clusters in use after "
                       "warm-up: the model may be collapsing (check --lam2, --tau, --lr, or use a smaller K)",
                       file=sys.stderr)
    return metrics
