"""``twist index LABELS_OR_FOLDER --out INDEX``: build (or update) an image index from ``twist label`` output.

A labels table brings its row-aligned embeddings (``T.embeddings.npy``) and the folder root (``T.meta.json``);
a folder is labelled first with ``--model``. Rows that failed to label are skipped. Vectors are streamed
from the memory-mapped embeddings in chunks, so the table can be larger than RAM for an IVF-PQ index.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twist_core.config import build_config, command_parser, option
from twist_core.folder import NoImagesError, scan_folder
from twist_core.index import ImageIndex
from twist_core.index_faiss import (
    ADD_CHUNK,
    KINDS,
    PQ_TRAIN_POINTS,
    TRAIN_POINTS_PER_LIST,
    build,
    normalized,
    plan_index,
    resolve_device,
)
from twist_core.index_store import IndexUserError
from twist_core.label_table import FORMATS, labels_paths, read_labels


@dataclass
class IndexConfig:
    source: str | None = option(None, "labels table of twist label (.csv/.jsonl/.parquet) or image folder")
    model: str | None = option(None, "ONNX model: labels a folder source, embeds new images; search default")
    out: str = option("index", "index folder (a new build replaces what is there atomically)")
    kind: str = option("auto", "index type: auto = flat up to 50k images, IVF above, IVF-PQ past 4 GB "
                       "of vectors", choices=list(KINDS))
    nlist: int = option(0, "IVF coarse lists; 0 = about 2 sqrt(N)")
    nprobe: int = option(0, "IVF lists searched per query (speed/recall trade-off); 0 = max(16, nlist/128)")
    pq_m: int = option(0, "IVF-PQ bytes per vector (sub-quantizers, divides the dimension); 0 = dim/8")
    device: str = option("auto", "where FAISS trains and searches", choices=["auto", "cpu", "cuda"])
    update: bool = option(False, "update the index at --out instead of rebuilding: drop deleted files, "
                                 "add new rows of the table (no source: label new files under its root)")
    seed: int = option(0, "seed of the k-means training sample")


def load_labels(table: Path) -> tuple[list[dict[str, Any]], np.ndarray, dict[str, Any]]:
    """Usable rows, their embeddings (memory-mapped, same order) and the table's metadata."""
    if not table.is_file():
        raise IndexUserError(f"labels table {table} not found")
    if table.suffix.lower() not in FORMATS:
        raise IndexUserError(f"{table}: expected a labels table ({', '.join(FORMATS)}) or a folder")
    embeddings_path, meta_path = labels_paths(table)
    if not embeddings_path.is_file():
        raise IndexUserError(f"{embeddings_path} not found: index needs the embeddings twist label saves "
                             "beside the table")
    rows, meta = read_labels(table)
    embeddings = np.load(embeddings_path, mmap_mode="r")
    if embeddings.ndim != 2 or len(embeddings) != len(rows):
        raise IndexUserError(f"{embeddings_path} has shape {embeddings.shape}, expected one row per table "
                             f"row ({len(rows)})")
    valid = np.array([i for i, row in enumerate(rows) if not row.get("error")], dtype=np.int64)
    if not len(valid):
        raise IndexUserError(f"{table} has no successfully labelled images")
    if "root" not in meta:
        raise IndexUserError(f"{meta_path} (with the folder root) is missing; label the folder again")
    usable = embeddings[valid] if len(valid) < len(rows) else embeddings
    return [rows[i] for i in valid], usable, meta


def _label_folder(folder: Path, config: IndexConfig) -> Path:
    if not config.model:
        raise IndexUserError("indexing a folder needs --model to compute its embeddings")
    from twist_core.label import LabelConfig, label_folder

    table = Path(config.out) / "labels.csv"
    label_folder(LabelConfig(model=config.model, folder=str(folder), out=str(table)))
    return table


def build_index(config: IndexConfig) -> Path:
    """Build the index described by ``config`` and publish it in ``config.out``; returns that folder."""
    source = Path(config.source)
    table = _label_folder(source, config) if source.is_dir() else source
    rows, embeddings, meta = load_labels(table)
    n, dim = embeddings.shape
    plan = plan_index(n, dim, config.kind, config.nlist, config.nprobe, config.pq_m)
    device = resolve_device(config.device)
    rng = np.random.default_rng(config.seed)
    sample_size = min(n, max(plan.nlist * TRAIN_POINTS_PER_LIST, PQ_TRAIN_POINTS * (plan.pq_m > 0)))
    picked = np.sort(rng.choice(n, sample_size, replace=False))
    sample = normalized(embeddings[picked]) if plan.nlist else None

    def chunks():
        for start in range(0, n, ADD_CHUNK):
            stop = min(n, start + ADD_CHUNK)
            yield np.arange(start, stop, dtype=np.int64), normalized(embeddings[start:stop])

    index = build(plan, dim, n, chunks, sample, device)
    model = config.model or meta.get("model")
    info = {"root": str(Path(meta["root"]).resolve()), "model": str(Path(model).resolve()) if model else None,
            "dim": dim, "kind": plan.kind, "metric": "cosine", "nlist": plan.nlist, "nprobe": plan.nprobe,
            "pq_m": plan.pq_m, "source": str(table.resolve())}
    ImageIndex.create(config.out, index, rows, info, device).close()
    return Path(config.out)


def update_index(config: IndexConfig) -> tuple[int, int]:
    """Drop entries whose files are gone, then add what is new; returns (added, removed)."""
    index = ImageIndex.open(config.out, config.device)
    removed = index.remove_missing()
    if config.source:
        rows, embeddings, _ = load_labels(Path(config.source))
        known = index.ids_for_paths([r["path"] for r in rows])
        new = [i for i, row in enumerate(rows)
               if row["path"] not in known and (index.root / row["path"]).is_file()]
        added = len(index.add([rows[i] for i in new], np.asarray(embeddings[new]))) if new else 0
    else:
        model_path = config.model or index.info.get("model")
        if not model_path:
            raise IndexUserError("no model recorded in the index; give --model to embed the new images")
        from twist_core.infer import OnnxModel

        known = set(index.paths())
        new = [path for path in scan_folder(index.root) if path not in known]
        added_ids, problems = index.add_images(OnnxModel(model_path, device=config.device), new) if new \
            else (np.zeros(0), [])
        for problem in problems:
            print(f"skipped {problem}", file=sys.stderr)
        added = len(added_ids)
    index.close()
    return added, removed


def build_parser() -> argparse.ArgumentParser:
    return command_parser("twist index", __doc__, IndexConfig, positional=("source",))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = build_config(IndexConfig, args, args.config)
        if config.update:
            added, removed = update_index(config)
            print(f"{config.out}: added {added}, removed {removed} images")
            return 0
        if not config.source:
            raise IndexUserError("give the labels table or image folder to index (or --update)")
        out = build_index(config)
        index = ImageIndex.open(out, "cpu")
        print(f"{out}: {index.size} images, {index.dim}-d, {index.kind} index"
              + (f" (nlist {index.info['nlist']}, nprobe {index.nprobe})" if index.kind != "flat" else ""))
        index.close()
    except (IndexUserError, ValueError, OSError, NoImagesError) as error:
        print(f"twist index: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
