"""``twist merge-tables OUT.csv A.csv B.csv ...``: one labels table from shards labelled apart (one job per
node or per subfolder), for one ``twist index``.

The shards must come from the same model (fingerprint), with the same embedding size and clusters; their
folders must be one root, or lie under ``--root`` (each shard's paths then get its subfolder in front). A path
in two shards is refused before anything is written (shards that overlap, or one labelled twice). Rows,
embeddings and the skipped list are streamed shard by shard, so memory stays at one chunk plus 16 bytes a row
(the duplicate check); the outputs appear together, the meta last. Each shard's ``review_score`` is kept as it
was scored within its shard; ``twist index`` scores every image again over the whole index.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from twist_core.config import option
from twist_core.errors import UserError
from twist_core.io_utils import StagedWrites, path_to_text
from twist_core.label.table import (
    Row,
    iter_labels,
    labels_meta,
    labels_paths,
    read_labels_meta,
    skipped_path,
    table_format,
    write_table,
)

CHUNK = 10_000  # rows (and embeddings) copied at once
SAME = ("model_sha256", "embedding_dim", "embedding_dtype", "class_names", "topk")


@dataclass
class MergeConfig:
    out: str = option(None, "table to write (.csv, .jsonl or .parquet); .embeddings.npy and .meta.json beside it")
    tables: list[str] = option([], "the shards' tables, in the order their rows are wanted",  # noqa: RUF009
                               cli=False)  # option() gives a list a default_factory
    root: str | None = option(None, "folder holding every shard's folder (default: the shards' one shared root)")
    overwrite: bool = option(False, "replace an existing table at OUT")


class MergeError(UserError):
    """Shards that cannot make one table (another model, another folder, a path in two shards, ...)."""


@dataclass(frozen=True)
class Shard:
    table: Path
    meta: dict[str, Any]
    prefix: str  # text put before each path: the shard's folder below the merged root ("" when the same)

    def rows(self) -> Iterator[Row]:
        for row in iter_labels(self.table):
            yield {**row, "path": self.prefix + row["path"]}


def open_shards(config: MergeConfig) -> tuple[list[Shard], Path]:
    """The shards with their metadata checked against the first one's, and the merged table's root."""
    if not config.out or len(config.tables) < 1:
        raise MergeError("give the table to write and the shards: twist merge-tables OUT.csv A.csv B.csv ...")
    if config.root and not Path(config.root).is_dir():
        raise MergeError(f"--root {config.root} is not a folder")
    metas = []
    for table in map(Path, config.tables):
        meta = read_labels_meta(table)
        if not table.is_file() or not meta or not labels_paths(table)[0].is_file():
            raise MergeError(f"{table}: not a table written by twist label (with its .meta.json and "
                             ".embeddings.npy beside it)")
        metas.append(meta)
    first = metas[0]
    for table, meta in zip(config.tables[1:], metas[1:], strict=True):
        differ = [key for key in SAME if meta.get(key) != first.get(key)]
        if differ:
            raise MergeError(f"{table} differs from {config.tables[0]} in {', '.join(differ)}: shards must be "
                             "labelled by the same model file (twist label with one exported model)")
    roots = [Path(meta["root"]) for meta in metas]
    root = Path(config.root).resolve() if config.root else roots[0]
    if not config.root and any(other != root for other in roots):
        raise MergeError(f"the shards were labelled in different folders ({', '.join(sorted(set(map(str, roots))))}); "
                         "give --root, the folder that holds them all")
    shards = []
    for table, meta, shard_root in zip(config.tables, metas, roots, strict=True):
        if not shard_root.is_relative_to(root):
            raise MergeError(f"{table} was labelled in {shard_root}, which is not inside --root {root}")
        below = shard_root.relative_to(root).as_posix()
        shards.append(Shard(Path(table), meta, "" if below == "." else path_to_text(below) + "/"))
    return shards, root


def path_key(path: str) -> int:
    return int.from_bytes(hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


def refuse_duplicates(shards: list[Shard]) -> None:
    """Refuse a path held by two rows: 8-byte keys of every path sorted, then the exact paths of equal keys.

    The same pass counts each shard's rows: a table whose rows are not the ones its embeddings were written for
    (edited in a spreadsheet) would pair every later row with another image's vector.
    """
    parts = []
    for shard in shards:
        part = np.fromiter((path_key(row["path"]) for row in shard.rows()), np.uint64)
        if len(part) != int(shard.meta["rows"]):
            raise MergeError(f"{shard.table} has {len(part)} rows but its meta file says {shard.meta['rows']}: the "
                             "table was changed after labelling; label that folder again")
        parts.append(part)
    keys = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    ordered = np.sort(keys)
    repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not repeated:
        return
    seen: dict[str, Path] = {}
    for shard in shards:
        for row in shard.rows():
            if path_key(row["path"]) in repeated:
                if row["path"] in seen:
                    raise MergeError(f"{row['path']} is in {seen[row['path']]} and in {shard.table}: the shards "
                                     "overlap (or one was given twice); label disjoint folders, or drop one")
                seen[row["path"]] = shard.table


def batched(rows: Iterator[Row], size: int = CHUNK) -> Iterator[list[Row]]:
    while chunk := list(islice(rows, size)):
        yield chunk


def merge_tables(config: MergeConfig) -> dict[str, Any]:
    """Write the merged table, embeddings, skipped list and meta (last); returns the meta."""
    out = Path(config.out)
    table_format(out)
    if out.exists() and not config.overwrite:
        raise MergeError(f"{out} already exists; pass --overwrite to replace it")
    shards, root = open_shards(config)
    refuse_duplicates(shards)
    first = shards[0].meta
    total = sum(int(shard.meta["rows"]) for shard in shards)
    embeddings_path, meta_path = labels_paths(out)

    def write_embeddings(tmp: str) -> None:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=first["embedding_dtype"],
                                          shape=(total, int(first["embedding_dim"])))
        start = 0
        for shard in shards:
            vectors = np.load(labels_paths(shard.table)[0], mmap_mode="r")
            if len(vectors) != int(shard.meta["rows"]):
                raise MergeError(f"{shard.table}: {len(vectors)} embeddings for {shard.meta['rows']} rows")
            for offset in range(0, len(vectors), CHUNK):
                block = vectors[offset:offset + CHUNK]
                array[start + offset:start + offset + len(block)] = block
            start += len(vectors)
        array.flush()

    def skipped_lines() -> str:
        lines = []
        for shard in shards:
            path = skipped_path(shard.table)
            text = path.read_text(encoding="utf-8") if path.is_file() else ""
            lines += [shard.prefix + line for line in text.splitlines() if line]
        return "".join(f"{line}\n" for line in lines)

    unreadable = [shard.prefix + folder for shard in shards for folder in shard.meta.get("unreadable_folders", [])]
    meta = labels_meta(out, root, first["model"], first["model_sha256"], first.get("checkpoint_sha256"),
                       first["embedding_dtype"], int(first["embedding_dim"]), total, int(first["topk"]),
                       first["class_names"], sum(int(shard.meta.get("processes", 1)) for shard in shards), unreadable)
    meta.update(labelled=sum(int(shard.meta["labelled"]) for shard in shards),
                errors=sum(int(shard.meta["errors"]) for shard in shards),
                cluster_sizes=np.sum([shard.meta["cluster_sizes"] for shard in shards], axis=0).tolist(),
                merged_from=[str(shard.table.resolve()) for shard in shards])
    with StagedWrites() as stage:
        stage(embeddings_path, write_embeddings)
        stage(out, lambda tmp: write_table(tmp, batched(row for shard in shards for row in shard.rows()),
                                           table_format(out)))
        stage(skipped_path(out), lambda tmp: Path(tmp).write_text(skipped_lines(), encoding="utf-8"))
        stage(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return meta
