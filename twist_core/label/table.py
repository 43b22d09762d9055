"""The labels table in csv, jsonl or parquet (chosen by extension), written in streamed chunks and read back.

A row is ``path, cluster, cluster_name, confidence, margin, topk, error, review_score``: ``topk`` is a JSON
string ``[[cluster, prob], ...]``; ``review_score`` (0 to 1, see :mod:`twist_core.label.review`) is how likely the
image is in the wrong cluster; a good row has an empty ``error``, an error row only ``path`` and ``error``.
Beside ``T.csv`` lie ``T.embeddings.npy`` (row-aligned, zeros for error rows) and ``T.meta.json``.
``path`` is table text (:func:`twist_core.io_utils.path_to_text`: non-UTF-8 bytes as ``\\xNN``); in a CSV a text
cell that a spreadsheet would run as a formula, or that starts with ``'``, gets a leading ``'`` that
:func:`iter_labels` removes again. JSONL and Parquet hold the text as it is.
"""

from __future__ import annotations

import csv
import datetime
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from twist_core import __version__
from twist_core.errors import UserError
from twist_core.io_utils import csv_safe

COLUMNS = ["path", "cluster", "cluster_name", "confidence", "margin", "topk", "error", "review_score"]
TEXT_COLUMNS = ("path", "cluster_name", "topk", "error")
FORMATS = (".csv", ".jsonl", ".parquet")
TOPK = 5  # most probable clusters listed per image (twist label --topk, the index, the app)
DIGITS = 6  # decimals kept of a probability, a confidence or a margin
Row = dict[str, Any]


def summarise(probs: np.ndarray, topk: int = TOPK) -> dict[str, np.ndarray]:
    """Per image: the most probable cluster, its probability (confidence), the margin to the second, and the
    ``topk`` most probable clusters with their probabilities. Ties keep the lower cluster first."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :topk]
    top = np.take_along_axis(probs, order, axis=1)
    second = top[:, 1] if top.shape[1] > 1 else np.zeros(len(top), probs.dtype)
    return {"cluster": order[:, 0].astype(np.int32), "confidence": top[:, 0], "margin": top[:, 0] - second,
            "topk_index": order.astype(np.int32), "topk_prob": top}


def summary_rows(paths: Sequence[str], summary: Mapping[str, np.ndarray], class_names: Sequence[str]) -> list[Row]:
    """Table rows (path, cluster, cluster_name, confidence, margin, topk, error) from :func:`summarise` output:
    the one place a label row is made (``twist label``, the index, the app's batch tab)."""
    rows = []
    for j, path in enumerate(paths):
        cluster = int(summary["cluster"][j])
        topk = [[int(c), round(float(p), DIGITS)] for c, p in zip(summary["topk_index"][j], summary["topk_prob"][j],
                                                                   strict=True)]
        rows.append({"path": path, "cluster": cluster, "cluster_name": class_names[cluster],
                     "confidence": round(float(summary["confidence"][j]), DIGITS),
                     "margin": round(float(summary["margin"][j]), DIGITS), "topk": json.dumps(topk), "error": ""})
    return rows


def label_rows(paths: Sequence[str], probs: np.ndarray, class_names: Sequence[str], topk: int = TOPK) -> list[Row]:
    """Table rows straight from class probabilities (N x K)."""
    return summary_rows(paths, summarise(probs, topk), class_names)


def error_row(path: str, error: str) -> Row:
    """The row of an image that could not be labelled: only its path and why."""
    return {"path": path, "cluster": None, "cluster_name": None, "confidence": None, "margin": None, "topk": None,
            "error": error}


def labels_meta(out: Path, root: Path, model: str | Path, model_sha: str | None, checkpoint_sha: str | None,
                embedding_dtype: str, embedding_dim: int, rows: int, topk: int, class_names: Sequence[str],
                processes: int, unreadable_folders: Sequence[str]) -> dict[str, Any]:
    """The ``T.meta.json`` of a table at ``out`` (before its counts: labelled, errors, cluster_sizes), the one
    place its keys are named (``twist label``, ``twist merge-tables``, the scale bench's synthetic tables)."""
    embeddings_path = labels_paths(out)[0]
    return {"format": 1, "root": str(root), "model": str(Path(model).resolve()), "model_sha256": model_sha,
            "checkpoint_sha256": checkpoint_sha, "table": out.name, "embeddings": embeddings_path.name,
            "embedding_dtype": embedding_dtype, "embedding_dim": embedding_dim, "columns": COLUMNS, "rows": rows,
            "topk": topk, "class_names": list(class_names), "processes": processes,
            "skipped": skipped_path(out).name, "unreadable_folders": list(unreadable_folders),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "twist_version": __version__}


class LabelsTableError(UserError):
    """A labels table a later stage cannot use (missing, not a table, no embeddings beside it); says why."""


class WriterUnavailable(UserError):
    """The table format asked for cannot be written here (Parquet without pyarrow)."""


def require_writer(path: str | Path) -> str:
    """The table's format, checked to be writable before any work is done; raises :class:`WriterUnavailable`."""
    kind = table_format(path)
    if kind == ".parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise WriterUnavailable(f"{path}: writing .parquet needs pyarrow (pip install pyarrow), or choose "
                                    "--out with .csv or .jsonl") from None
    return kind


def csv_cell(value: object) -> object:
    """A cell as the labels CSV holds it: formulas neutralised by a leading ``'`` (and a leading ``'`` doubled,
    so that :func:`csv_text` restores every value exactly)."""
    if isinstance(value, str) and value.startswith("'"):
        return "'" + value
    return csv_safe(value)


def csv_text(cell: str) -> str:
    """The value a :func:`csv_cell` was written from."""
    return cell[1:] if cell.startswith("'") else cell


def table_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: the table must end in {', '.join(FORMATS)}")
    return suffix


def labels_paths(table_path: str | Path) -> tuple[Path, Path]:
    """``(embeddings, meta)`` paths beside a table: ``T.csv`` -> ``T.embeddings.npy``, ``T.meta.json``."""
    table_path = Path(table_path)
    stem = table_path.with_suffix("")
    return stem.with_name(stem.name + ".embeddings.npy"), stem.with_name(stem.name + ".meta.json")


def skipped_path(table_path: str | Path) -> Path:
    """``T.skipped.txt`` beside ``T.csv``: one ``path<TAB>reason`` line per unreadable image or folder."""
    table_path = Path(table_path)
    return table_path.with_name(table_path.with_suffix("").name + ".skipped.txt")


def _arrow_schema():
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("cluster", pa.int32()), ("cluster_name", pa.string()),
                      ("confidence", pa.float32()), ("margin", pa.float32()), ("topk", pa.string()),
                      ("error", pa.string()), ("review_score", pa.float32())])


def write_table(path: str | Path, chunks: Iterable[list[Row]], kind: str | None = None) -> int:
    """Write rows chunk by chunk (memory stays at one chunk); returns the number of rows.

    ``kind`` (".csv", ".jsonl", ".parquet") overrides the extension, for temporary files.
    """
    kind = kind or table_format(path)
    count = 0
    if kind == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = _arrow_schema()
        with pq.ParquetWriter(str(path), schema) as writer:
            for rows in chunks:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                count += len(rows)
            if count == 0:
                writer.write_table(schema.empty_table())
        return count
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, COLUMNS) if kind == ".csv" else None
        if writer:
            writer.writeheader()
        for rows in chunks:
            for row in rows:
                if writer:
                    writer.writerow({k: "" if v is None else csv_cell(v) for k, v in row.items()})
                else:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += len(rows)
    return count


def _typed(row: dict[str, Any]) -> Row:
    """One row with the same Python types whatever the format: None for absent values, error '' when fine."""
    def value(key: str, kind: type) -> Any:
        raw = row.get(key)
        return None if raw is None or raw == "" else kind(raw)

    return {"path": row["path"], "cluster": value("cluster", int), "cluster_name": value("cluster_name", str),
            "confidence": value("confidence", float), "margin": value("margin", float),
            "topk": value("topk", str), "error": row.get("error") or "",
            "review_score": value("review_score", float)}  # None in tables written before the score


def iter_labels(path: str | Path) -> Iterator[Row]:
    """Rows of a table in order, typed as :func:`_typed` describes."""
    kind = table_format(path)
    if kind == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(str(path))
        for group in range(parquet.num_row_groups):
            yield from (_typed(row) for row in parquet.read_row_group(group).to_pylist())
        return
    with open(path, newline="", encoding="utf-8") as handle:
        if kind == ".csv":
            cells = csv.reader(handle)
            header = next(cells, [])
            yield from (csv_row(header, row) for row in cells)
        else:
            yield from (_typed(json.loads(line)) for line in handle if line.strip())


def csv_row(header: Sequence[str], cells: Sequence[str]) -> Row:
    """One CSV row (its cells under ``header``) typed as :func:`_typed` describes."""
    return _typed({key: csv_text(value) if key in TEXT_COLUMNS and value else value
                   for key, value in zip(header, cells, strict=False)})


def load_labels(table: Path) -> tuple[list[dict[str, Any]], np.ndarray, dict[str, Any]]:
    """Usable rows, their embeddings (memory-mapped, same order) and the table's metadata."""
    if not table.is_file():
        raise LabelsTableError(f"labels table {table} not found")
    if table.suffix.lower() not in FORMATS:
        raise LabelsTableError(f"{table}: expected a labels table ({', '.join(FORMATS)}) or a folder")
    embeddings_path, meta_path = labels_paths(table)
    if not embeddings_path.is_file():
        raise LabelsTableError(f"{embeddings_path} not found: index needs the embeddings twist label saves "
                             "beside the table")
    rows, meta = read_labels(table)
    embeddings = np.load(embeddings_path, mmap_mode="r")
    if embeddings.ndim != 2 or len(embeddings) != len(rows):
        raise LabelsTableError(f"{embeddings_path} has shape {embeddings.shape}, expected one row per table "
                             f"row ({len(rows)})")
    valid = np.array([i for i, row in enumerate(rows) if not row.get("error")], dtype=np.int64)
    if not len(valid):
        raise LabelsTableError(f"{table} has no successfully labelled images")
    if "root" not in meta:
        raise LabelsTableError(f"{meta_path} (with the folder root) is missing; label the folder again")
    usable = embeddings[valid] if len(valid) < len(rows) else embeddings
    return [rows[i] for i in valid], usable, meta


def read_labels_meta(table: str | Path) -> dict[str, Any]:
    """The ``.meta.json`` beside a table (root, model, its fingerprint, counts); empty when there is none."""
    meta_path = labels_paths(table)[1]
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}


def read_labels(path: str | Path) -> tuple[list[Row], dict[str, Any]]:
    """All rows of a csv/jsonl/parquet table and its ``.meta.json`` (root, model, counts, columns)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no labels table at {path}")
    return list(iter_labels(path)), read_labels_meta(path)
