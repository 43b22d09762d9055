"""``twist label MODEL FOLDER --out T.csv``: label every image of a folder with an exported model.

Read top to bottom: check the model and options, prepare (or resume) the work folder ``T.csv.parts/``,
label this process's pending chunks (decoding in worker processes while onnxruntime runs), then merge
the chunks in scan order into the table, its row-aligned embeddings and its meta file.
A chunk file is written atomically once all its images are done, so a killed run loses at most one chunk
per process and a re-run continues without duplicates or gaps, with any number of processes.
Run with ``twist label ...`` or ``torchrun --nproc_per_node N -m twist_core.label ...``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from twist_core import distributed
from twist_core.config import AUTO, AutoConfig, auto_option, option
from twist_core.data.dataset import DecodedCrops, collate
from twist_core.data.folder import DEFAULT_MAX_PIXELS, NoImagesError, require_images, skipped_lines
from twist_core.deploy.infer import ModelOutputError, OnnxModel, finite_rows, physical_cores
from twist_core.errors import UserError
from twist_core.io_utils import StagedWrites, atomic_write, atomic_write_text, file_sha256, path_to_text
from twist_core.label import review
from twist_core.label.table import (
    TOPK,
    Row,
    error_row,
    iter_labels,
    labels_meta,
    labels_paths,
    read_labels,
    require_writer,
    skipped_path,
    summarise,
    summary_rows,
    table_format,
    write_table,
)
from twist_core.label.tree import file_names, folder_names, prepare_tree, write_tree

__all__ = ["LabelConfig", "LabelError", "label_folder", "labels_paths", "read_labels"]

STATE = "state.json"
FILES = "files.json"
UNREADABLE = "unreadable.json"
NON_FINITE = "the model's output is not finite (NaN or inf) for this image"
SUMMARY_KEYS = ("cluster", "confidence", "margin", "topk_index", "topk_prob")  # saved per chunk by summarise


@dataclass
class LabelConfig(AutoConfig):
    model: str = option(None, "exported model (.onnx) written by twist export")
    folder: str = option(None, "folder of images to label (searched recursively)")
    out: str = option("labels.csv", "table to write (.csv, .jsonl or .parquet); .embeddings.npy and "
                                    ".meta.json go beside it")
    topk: int = option(TOPK, "number of most probable clusters listed per image (capped at K)")
    batch_size: int = option(64, "images per inference batch")
    chunk_size: int = option(1024, "images per committed chunk: a killed run redoes at most one per process")
    workers: int | str = auto_option(-1, "decoding workers per process; auto: the cores left beside inference")
    threads: int | str = auto_option(0, "onnxruntime threads per process; auto: physical cores / processes on this "
                                        "node")
    device: str = option("auto", "auto (CUDA when onnxruntime can use it), cpu, cuda or cuda:N")
    embedding_dtype: str = option("float16", "dtype of the saved embeddings", choices=["float16", "float32"])
    export_tree: str | None = option(None, "also write an ImageFolder-style tree DIR/<cluster name>/<file>")
    tree_mode: str = option("symlink", "how the tree holds the images", choices=["symlink", "copy"])
    min_confidence: float = option(0.0, "in the tree, images below this confidence go to _uncertain")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "refuse images with more pixels (decompression bombs)")
    overwrite: bool = option(False, "discard a finished or partial output with this name and label again")
    progress: bool = option(True, "show a progress bar with images/s")


class LabelError(UserError):
    """The run cannot go on as asked (an output in the way, a resume with another model or folder, ...)."""


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def chunk_path(work: Path, chunk: int) -> Path:
    return work / f"chunk-{chunk:08d}.npz"


def run_state(config: LabelConfig, model_sha: str, root: Path, files: list[str], topk: int) -> dict[str, Any]:
    """What a resumed run must share with the one it continues."""
    files_sha = hashlib.sha256("\n".join(files).encode("utf-8", "surrogateescape")).hexdigest()
    return {"model_sha256": model_sha, "root": str(root), "n_files": len(files), "files_sha256": files_sha,
            "chunk_size": config.chunk_size, "topk": topk, "embedding_dtype": config.embedding_dtype}


def prepare_work(config: LabelConfig, model_sha: str, root: Path, topk: int) -> None:
    """Start a work folder, or check that the existing one continues the same job (main process only)."""
    out, work = Path(config.out), work_dir(Path(config.out))
    if config.overwrite and work.exists():
        shutil.rmtree(work)
    if out.exists() and not work.exists() and not config.overwrite:
        raise LabelError(f"{out} already exists (a finished run); pass --overwrite to label again")
    unreadable: dict[str, str] = {}
    files = require_images(root, unreadable)
    state = run_state(config, model_sha, root, files, topk)
    if (work / STATE).exists():
        saved = json.loads((work / STATE).read_text())
        changed = [key for key in state if saved.get(key) != state[key]]
        if changed:
            what = {"model_sha256": "the model", "root": "the folder", "n_files": "the folder's files",
                    "files_sha256": "the folder's files"}
            reasons = sorted({what.get(key, f"--{key.replace('_', '-')}") for key in changed})
            raise LabelError(f"{work} is a partial run with a different {', '.join(reasons)}; run the same "
                             "command again to continue it, or pass --overwrite to start again")
        for stale in work.glob(".*.tmp"):  # a chunk being written when the run was killed
            stale.unlink()
        return
    if work.exists():  # killed before the state was committed: nothing in it can be trusted
        shutil.rmtree(work)
    work.mkdir(parents=True)
    atomic_write_text(work / FILES, json.dumps(files))
    atomic_write_text(work / UNREADABLE, json.dumps(unreadable))
    atomic_write_text(work / STATE, json.dumps(state, indent=2) + "\n")


def chunk_batches(chunks: list[int], chunk_size: int, batch_size: int, n_files: int) -> list[list[int]]:
    """Batches never cross a chunk boundary, so a chunk is complete when its last batch is."""
    batches = []
    for chunk in chunks:
        end = min((chunk + 1) * chunk_size, n_files)
        batches += [list(range(start, min(start + batch_size, end)))
                    for start in range(chunk * chunk_size, end, batch_size)]
    return batches


def save_chunk(path: Path, errors: list[str], ok: np.ndarray, probs: np.ndarray, embeddings: np.ndarray,
               topk: int, dtype: str) -> None:
    """One finished chunk: per-image summaries, embeddings (zeros for errors) and error texts."""
    n = len(errors)
    parts = summarise(probs, topk)
    full: dict[str, np.ndarray] = {"embeddings": np.zeros((n, embeddings.shape[1]), dtype)}
    full["embeddings"][ok] = embeddings
    for key, value in parts.items():
        full[key] = np.full((n, *value.shape[1:]), -1 if key.endswith(("cluster", "index")) else np.nan,
                            value.dtype)
        full[key][ok] = value
    full["error"] = np.array(errors, dtype=str)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **full)

    atomic_write(path, write)


def predict_finite(model: OnnxModel, crops: np.ndarray, errors: list[str],
                   dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and embeddings of the decoded crops; a row that is NaN/inf, or overflows the saved ``dtype``,
    becomes an error row (``errors`` updated in place)."""
    probs, embeddings = model.predict_arrays(model.transform.normalize(crops))
    with np.errstate(over="ignore"):
        finite = finite_rows(probs, embeddings.astype(dtype))
    if not finite.all():
        decoded = [position for position, error in enumerate(errors) if not error]
        for row in np.flatnonzero(~finite):
            errors[decoded[row]] = NON_FINITE
    return probs[finite], embeddings[finite]


@dataclass
class OutputHealth:
    """Counts of decoded images and NaN/inf outputs: most of them NaN means the model, not the images, is broken."""

    decoded: int = 0
    non_finite: int = 0

    def add(self, errors: list[str]) -> None:
        self.non_finite += sum(1 for error in errors if error == NON_FINITE)
        self.decoded += sum(1 for error in errors if not error or error == NON_FINITE)

    def check(self, model: str, at_least: int = 0) -> None:
        """Refuse once more than half of at least ``at_least`` decoded images gave NaN/inf."""
        if self.non_finite and 2 * self.non_finite > self.decoded >= at_least:
            raise ModelOutputError(f"{model} gives NaN or infinite outputs for {self.non_finite} of {self.decoded} "
                                   "images: the file is damaged (or was exported from a diverged run); export it "
                                   "again, then label with --overwrite")


def label_chunks(model: OnnxModel, root: Path, files: list[str], chunks: list[int], work: Path,
                 config: LabelConfig, topk: int, workers: int, show: bool) -> int:
    """Label this process's chunks in order, committing each as it completes; returns images done."""
    from tqdm import tqdm

    batches = chunk_batches(chunks, config.chunk_size, config.batch_size, len(files))
    loader = DataLoader(DecodedCrops(root, files, model.transform), batch_sampler=batches,
                        num_workers=workers, collate_fn=collate, prefetch_factor=4 if workers else None)
    total = sum(len(batch) for batch in batches)
    errors: list[str] = []
    probs: list[np.ndarray] = []
    embeddings: list[np.ndarray] = []
    health = OutputHealth()
    with tqdm(total=total, unit="img", desc="labelling", disable=not show, dynamic_ncols=True) as bar:
        for indices, crops, batch_errors in loader:
            if len(crops):
                batch_probs, batch_embeddings = predict_finite(model, crops.numpy(), batch_errors,
                                                                   config.embedding_dtype)
                probs.append(batch_probs)
                embeddings.append(batch_embeddings)
            errors += batch_errors
            chunk = indices[0] // config.chunk_size
            if indices[-1] + 1 == min((chunk + 1) * config.chunk_size, len(files)):
                health.add(errors)
                health.check(config.model, at_least=32)  # stop early; the merge checks all images
                ok = np.array([not error for error in errors])
                all_probs = np.concatenate(probs) if probs else np.zeros((0, model.n_classes), np.float32)
                all_embeddings = (np.concatenate(embeddings) if embeddings
                                  else np.zeros((0, model.embedding_dim), np.float32))
                save_chunk(chunk_path(work, chunk), errors, ok, all_probs, all_embeddings, topk,
                           config.embedding_dtype)
                errors, probs, embeddings = [], [], []
            bar.update(len(indices))
    return total


def chunk_rows(data: Any, files: list[str], start: int, class_names: list[str]) -> list[Row]:
    errors = data["error"].tolist()
    paths = [path_to_text(files[start + j]) for j in range(len(errors))]  # a non-UTF-8 name is escaped, not fatal
    good = np.array([not error for error in errors], dtype=bool)
    labelled = iter(summary_rows([p for p, ok in zip(paths, good, strict=True) if ok],
                                 {key: data[key][good] for key in SUMMARY_KEYS}, class_names))
    return [error_row(path, error) if error else next(labelled) for path, error in zip(paths, errors, strict=True)]


def iter_chunks(work: Path, n_chunks: int) -> Iterator[Any]:
    for chunk in range(n_chunks):
        with np.load(chunk_path(work, chunk), allow_pickle=False) as data:
            yield data


def merge(config: LabelConfig, model: OnnxModel, model_sha: str, root: Path, files: list[str],
          topk: int, processes: int) -> dict[str, Any]:
    """Chunks -> embeddings, table, skipped list and meta in scan order, renamed into place together (meta last),
    then the optional tree. A failure (a full disk) leaves earlier outputs as they were and the chunks kept."""
    out, work = Path(config.out), work_dir(Path(config.out))
    n_chunks = -(-len(files) // config.chunk_size)
    embeddings_path, meta_path = labels_paths(out)
    health = OutputHealth()
    for data in iter_chunks(work, n_chunks):  # before writing anything: a broken model leaves no table
        health.add(data["error"].tolist())
    health.check(config.model)

    def write_embeddings(tmp: str) -> None:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=config.embedding_dtype,
                                          shape=(len(files), model.embedding_dim))
        for chunk, data in enumerate(iter_chunks(work, n_chunks)):
            start = chunk * config.chunk_size
            array[start:start + len(data["error"])] = data["embeddings"]
        array.flush()
        del array

    scores = review.score_chunks(lambda: ((data["cluster"], data["margin"], data["embeddings"])
                                          for data in iter_chunks(work, n_chunks)), len(files), model.embedding_dim)
    sizes = np.zeros(model.n_classes, np.int64)
    unreadable = read_unreadable(work)
    skipped = skipped_lines(unreadable)

    def rows() -> Iterator[list[Row]]:
        for chunk, data in enumerate(iter_chunks(work, n_chunks)):
            good = data["cluster"][data["cluster"] >= 0]
            sizes[:] += np.bincount(good, minlength=model.n_classes)
            chunk_table = chunk_rows(data, files, chunk * config.chunk_size, model.class_names)
            review.fill_column(chunk_table, scores[chunk * config.chunk_size:])
            skipped.extend(f"{row['path']}\t{row['error']}" for row in chunk_table if row["error"])
            yield chunk_table

    meta = labels_meta(out, root, config.model, model_sha, model.card.get("checkpoint_sha256"),
                       config.embedding_dtype, model.embedding_dim, len(files), topk, model.class_names, processes,
                       sorted(unreadable))
    with StagedWrites() as stage:
        stage(embeddings_path, write_embeddings)
        stage(out, lambda tmp: write_table(tmp, rows(), table_format(out)))
        n_errors = len(skipped) - len(unreadable)
        meta.update(labelled=len(files) - n_errors, errors=n_errors, cluster_sizes=sizes.tolist())
        stage(skipped_path(out), lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in skipped),
                                                                   encoding="utf-8"))
        stage(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    if config.export_tree:
        meta["tree"] = export_tree(config, root, out, files, model.class_names)
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(work)
    return meta


def export_tree(config: LabelConfig, root: Path, out: Path, files: list[str], class_names: list[str]
                ) -> dict[str, Any]:
    """The ImageFolder tree of the finished table; a tree left half-made (a full disk) is removed again."""
    tree = Path(config.export_tree)
    prepare_tree(tree, config.overwrite)
    try:
        placed = write_tree(tree, root, iter_labels(out), file_names(files), folder_names(class_names),
                            config.tree_mode, config.min_confidence)
    except BaseException:
        shutil.rmtree(tree, ignore_errors=True)
        raise
    return {"path": str(tree.resolve()), "mode": config.tree_mode, "folders": dict(placed)}


def read_unreadable(work: Path) -> dict[str, str]:
    """The subfolders the scan could not read (a work folder from an older version has no list)."""
    path = work / UNREADABLE
    return json.loads(path.read_text()) if path.is_file() else {}


def check_options(config: LabelConfig) -> None:
    if not config.model or not config.folder:
        raise LabelError("give the model and the folder: twist label MODEL.onnx FOLDER --out T.csv")
    require_writer(config.out)  # before the first image: a missing writer must not waste the whole run
    if config.batch_size < 1 or config.chunk_size < 1 or config.topk < 1:
        raise LabelError("--batch-size, --chunk-size and --topk must be at least 1")
    if not Path(config.folder).is_dir():
        raise NoImagesError(f"{config.folder} is not a folder")


def label_folder(config: LabelConfig) -> dict[str, Any]:
    """Label (or finish labelling) a folder in this process or under torchrun; returns the run's summary."""
    with distributed.process_group("cpu") as ctx:  # processes only exchange small objects: gloo is enough, GPU or not
        return _label_folder(config, ctx)


def _label_folder(config: LabelConfig, ctx: distributed.Context) -> dict[str, Any]:
    check_options(config)
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = physical_cores()
    device = config.device
    if ctx.distributed and device in ("auto", "cuda"):
        device = f"{device}:{ctx.local_rank}"
    threads = max(1, cores // local_procs) if config.threads == AUTO else config.threads
    model = OnnxModel(config.model, device, threads, spin=False)
    model_sha = file_sha256(model.path)
    root, topk = Path(config.folder).resolve(), min(config.topk, model.n_classes)
    work = work_dir(Path(config.out))

    problem = None
    if ctx.is_main:
        try:
            prepare_work(config, model_sha, root, topk)
        except (LabelError, NoImagesError) as error:
            problem = error
    gathered = distributed.all_gather_objects(ctx, str(problem) if problem else None)  # also a barrier
    if problem:
        raise problem
    if gathered[0]:
        raise LabelError(gathered[0])

    files: list[str] = json.loads((work / FILES).read_text())
    n_chunks = -(-len(files) // config.chunk_size)
    pending = [c for c in range(n_chunks) if not chunk_path(work, c).exists()]
    mine = pending[ctx.rank::ctx.world_size]
    workers = max(1, min(8, cores // local_procs - 1)) if config.workers == AUTO else config.workers
    start = time.perf_counter()
    show = config.progress and ctx.is_main
    done = label_chunks(model, root, files, mine, work, config, topk, workers, show)
    seconds = time.perf_counter() - start
    finished = distributed.all_gather_objects(ctx, done)  # every process has committed its chunks
    summary: dict[str, Any] = {"images_this_run": sum(finished), "seconds": seconds,
                               "images_per_s": sum(finished) / max(seconds, 1e-9),
                               "resumed_chunks": n_chunks - len(pending), "providers": model.providers}
    if ctx.is_main:
        summary.update(merge(config, model, model_sha, root, files, topk, ctx.world_size))
    return summary
