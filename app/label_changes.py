"""What a new model (after ``twist finetune``) changed against a previous labelling of the same images.

The previous labelling is an earlier labels table of ``twist label`` (.csv/.jsonl/.parquet) or another index
folder. Images are matched by file (root joined to the path) and clusters by name, as ``twist finetune`` carries
the curated names into the new model (cluster numbers change when a merge lowers K). The app reads only files
inside the places it is given (:func:`within_places`), so the box cannot probe the server's files.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twist_core.curate.curation import EXCLUDED
from twist_core.index.metadata import IndexMetadata, IndexUserError, meta_path
from twist_core.io_utils import path_from_text
from twist_core.label.table import FORMATS, read_labels

if TYPE_CHECKING:
    from app.workspace import Workspace


class ChangesError(ValueError):
    """The previous labelling cannot be read or compared; the message says why."""


@dataclass(frozen=True)
class Changes:
    """Per-cluster counts (name, before, after) and the changed images (file, before name, after name)."""

    counts: list[dict[str, Any]]
    changed: list[tuple[str, str, str]]
    compared: int
    only_before: int
    only_after: int


def cluster_names_by_file(source: Path) -> dict[str, str]:
    """Absolute file -> cluster name of every labelled image in an index folder or a labels table."""
    source = Path(source)
    if source.is_dir():
        try:
            meta = IndexMetadata(meta_path(source))
        except IndexUserError as error:
            raise ChangesError(str(error)) from None
        try:
            root = Path(meta.info()["root"])
            rows = [{"path": r["path"], "cluster": r["cluster"], "cluster_name": r["cluster_name"]}
                    for r in meta.records(None, "id", False, 0, meta.count(), 0.0, 1.0)]
        finally:
            meta.close()
    else:
        if source.suffix.lower() not in FORMATS or not source.is_file():
            raise ChangesError(f"{source}: give a labels table of twist label ({', '.join(FORMATS)}) or an index "
                               "folder")
        rows, meta_info = read_labels(source)
        if "root" not in meta_info:
            raise ChangesError(f"{source} has no .meta.json with the folder root beside it: label the folder again")
        root = Path(meta_info["root"])
    return {os.path.normpath(root / path_from_text(row["path"])): row.get("cluster_name") or f"cluster {row['cluster']}"
            for row in rows if row.get("cluster") is not None}


def compare(before: dict[str, str], after: dict[str, str]) -> Changes:
    """Counts per cluster name on each side and the files present on both whose cluster name differs."""
    common = before.keys() & after.keys()
    counts_before, counts_after = Counter(before.values()), Counter(after.values())
    names = sorted(counts_before.keys() | counts_after.keys(), key=lambda n: (-counts_after[n], n))
    counts = [{"cluster": name, "before": counts_before[name], "after": counts_after[name],
               "change": counts_after[name] - counts_before[name]} for name in names]
    changed = sorted((file, before[file], after[file]) for file in common if before[file] != after[file])
    return Changes(counts, changed, len(common), len(before.keys() - common), len(after.keys() - common))


def within_places(previous: str | Path, places: Sequence[Path]) -> Path:
    """The previous labelling's path, if it lies in one of ``places`` (the first one anchors a relative path).

    The app reads no other place on the server: the answer is the same whether an outside path exists or not,
    so the box cannot be used to probe the server's files.
    """
    text = str(previous).strip()
    if not text:
        raise ChangesError("give the previous labels table or index folder to compare with")
    roots = [Path(os.path.realpath(place)) for place in places]
    path = Path(os.path.realpath(roots[0] / text))  # an absolute text replaces the anchor
    if not any(path.is_relative_to(root) for root in roots):
        raise ChangesError("give a labels table or index folder inside " + " or ".join(map(str, roots)) +
                           " (a name alone is looked up beside the index): the app reads no other place")
    if not path.exists():
        raise ChangesError(f"{path} does not exist")
    return path


def model_changes(previous: str | Path, current_index: Path, places: Sequence[Path],
                  current: Mapping[str, str] | None = None, aliases: Mapping[str, str] | None = None) -> Changes:
    """Compare ``previous`` (inside ``places``) with the open index ``current_index``, or with ``current`` (file ->
    cluster name as curated now); ``aliases`` renames the previous side's names (a model name -> its new name)."""
    before = cluster_names_by_file(within_places(previous, places))
    before = {file: (aliases or {}).get(name, name) for file, name in before.items()}
    return compare(before, dict(current) if current is not None else cluster_names_by_file(current_index))


def curated_labelling(ws: Workspace) -> tuple[dict[str, str], dict[str, str]]:
    """File -> cluster name of the open index as curated now (moves, merges, exclusions, names), and each model
    name renamed since -> its current name, so a rename made after the compared model is no change."""
    names = {**ws.names(), EXCLUDED: "excluded"}
    files = {os.path.normpath(ws.root / path_from_text(r.path)): names.get(r.label, f"cluster {r.label}")
             for r in ws.store.iter_records() if r.label is not None}
    current = set(names.values())
    aliases = {model: names[c] for c, model in enumerate(ws.store.default_names)
               if names.get(c, model) != model and model not in current}
    return files, aliases
