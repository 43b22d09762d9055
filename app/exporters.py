"""Write the curated labels out: a CSV table, an ImageFolder tree (or a zip of one), Label Studio tasks.

All three stream :class:`twist_core.curate.curation.Record` rows, so an export of any size never holds the
dataset in memory.
Excluded images are listed in the CSV (with status ``excluded`` and no label) and left out of the others.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import quote

from twist_core.curate.curation import EXCLUDED, Record
from twist_core.io_utils import atomic_write, csv_safe, mark_output_folder, path_from_text
from twist_core.label.tree import MARKER, file_names, folder_names

CSV_COLUMNS = ["id", "path", "label", "label_name", "predicted", "predicted_name", "confidence", "status"]
LABEL_STUDIO_PREFIX = "/data/local-files/?d="  # Label Studio's local-files storage URL


def _text(value: int | None) -> str:
    return "" if value is None else str(value)


def write_csv(records: Iterable[Record], names: dict[int, str], out: Path) -> Path:
    """The labels table; text cells a spreadsheet would run as a formula get a leading quote (JSON keeps them)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for r in records:
                label = None if r.label == EXCLUDED else r.label
                row = [r.id, r.path, _text(label), names.get(label, "") if label is not None else "",
                       _text(r.predicted), names.get(r.predicted, "") if r.predicted is not None else "",
                       "" if r.confidence is None else f"{r.confidence:.4f}", r.status]
                writer.writerow([csv_safe(cell) for cell in row])

    atomic_write(out, write)
    return out


def placed(records: Iterable[Record], names: dict[int, str]) -> list[tuple[Record, str]]:
    """Each labelled image with its ``<label folder>/<file>`` name in an ImageFolder tree (twist label's rules)."""
    kept = [r for r in records if r.label is not None and r.label != EXCLUDED]
    clusters = sorted(names)
    folders = dict(zip(clusters, folder_names([names[c] for c in clusters]), strict=True))
    files = file_names([r.path for r in kept])
    return [(r, f"{folders[r.label]}/{files[r.path]}") for r in kept]  # type: ignore[index]


def write_tree(records: Iterable[Record], names: dict[int, str], root: Path, tree: Path,
               mode: str = "symlink") -> dict[str, int]:
    """``tree/<label name>/<file>`` as symlinks (or copies); returns images per folder.

    The tree must be new or one this app (or ``twist label``) wrote before: a marker file guards user folders.
    """
    if mode not in ("symlink", "copy"):
        raise ValueError(f"tree mode must be symlink or copy, not {mode!r}")
    if tree.exists() and any(tree.iterdir()):
        if not (tree / MARKER).exists():
            raise FileExistsError(f"{tree} is not empty and was not written by twist; choose another folder")
        shutil.rmtree(tree)
    tree.mkdir(parents=True, exist_ok=True)
    (tree / MARKER).write_text("written by twist app; safe to delete\n")
    mark_output_folder(tree)  # folder scans skip it, even when it lies inside a dataset
    counts: dict[str, int] = {}
    for r, name in placed(records, names):
        target = tree / name
        target.parent.mkdir(exist_ok=True)
        source = (root / path_from_text(r.path)).resolve()
        if mode == "symlink":
            os.symlink(source, target)
        else:
            shutil.copy2(source, target)
        counts[target.parent.name] = counts.get(target.parent.name, 0) + 1
    return counts


def write_zip(records: Iterable[Record], names: dict[int, str], root: Path, out: Path,
              progress: Callable[[int, int], None] | None = None) -> Path:
    """The ImageFolder tree as a zip (images stored, not recompressed: they are already compressed).

    ``progress(done, total)`` is called as images are written (the app shows it).
    """
    entries = placed(records, names)

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
            for done, (r, name) in enumerate(entries, 1):
                source = root / path_from_text(r.path)
                if source.is_file():
                    archive.write(source, name)
                if progress is not None:
                    progress(done, len(entries))

    atomic_write(out, write)
    return out


def image_url_prefix(url_prefix: str, dataset_root: Path | None = None) -> str:
    """What goes before each image's dataset path in a task's URL.

    Label Studio serves local files only from a storage folder strictly inside its document root, by paths
    relative to that root. So the bare local-files prefix gets the dataset folder's name: start Label Studio
    with LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT set to the dataset's parent folder and add the dataset folder
    as the project's local storage. Any other prefix is used as given, ending in ``/`` (or ``=``).
    """
    if url_prefix == LABEL_STUDIO_PREFIX and dataset_root is not None and Path(dataset_root).name:
        return url_prefix + quote(Path(dataset_root).name) + "/"
    return url_prefix if not url_prefix or url_prefix.endswith(("/", "=")) else url_prefix + "/"


def label_studio_tasks(records: Iterable[Record], names: dict[int, str], model_version: str,
                       url_prefix: str = LABEL_STUDIO_PREFIX, dataset_root: Path | None = None,
                       index_uid: str | None = None) -> list[dict]:
    """Label Studio import tasks: the image URL and the curated label as a scored prediction.

    A model label keeps its confidence as score; a label a person set (moved, merged) gets score 1. Each task
    names the index (``twist_index``, its uid), so ``twist import-labels`` can tell its ids are this index's.
    """
    prefix = image_url_prefix(url_prefix, dataset_root)
    tasks = []
    for r in records:
        if r.label is None or r.label == EXCLUDED:
            continue
        score = 1.0 if r.status != "predicted" else round(float(r.confidence or 0.0), 4)
        result = {"from_name": "label", "to_name": "image", "type": "choices",
                  "value": {"choices": [names.get(r.label, str(r.label))]}, "score": score}
        tasks.append({"data": {"image": prefix + quote(r.path), "twist_id": r.id, "twist_index": index_uid},
                      "predictions": [{"model_version": model_version, "score": score, "result": [result]}]})
    return tasks


def label_studio_config(names: Iterable[str]) -> str:
    """The labelling configuration (XML) whose names match the tasks' ``from_name``/``to_name``."""
    choices = "\n".join(f'    <Choice value="{_xml(n)}"/>' for n in names)
    return (f'<View>\n  <Image name="image" value="$image"/>\n  <Choices name="label" toName="image" '
            f'choice="single">\n{choices}\n  </Choices>\n</View>\n')


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def write_label_studio(records: Iterable[Record], names: dict[int, str], model_version: str, out: Path,
                       url_prefix: str = LABEL_STUDIO_PREFIX, dataset_root: Path | None = None,
                       index_uid: str | None = None) -> Path:
    tasks = label_studio_tasks(records, names, model_version, url_prefix, dataset_root, index_uid)
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(tasks, indent=1) + "\n"))
    return out
