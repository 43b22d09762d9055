"""Where a command may write: never over one of its inputs, never into an image folder it reads, and never
over a file that belongs to an index, a training run, an exported model or a labels table.

Every command that writes where the user says (``--out``, ``--json``, ``--plot``, ``--confusion``,
``--export-tree``, ``--workspace``) calls :func:`check_outputs` with those paths before it starts, so a mistyped
path is one line and exit code 2 before anything is read or written. The folders and files other commands made are
recognised by what they hold (their marker files), not by their names:

- an index folder has ``manifest.json`` and the ``.twist-output`` marker (or ``gen-*`` generations); an app
  state folder has ``curation.sqlite``: nothing is written inside either, except by ``twist index`` into its own;
- a training run has ``config.json`` and ``last.pt`` or ``metrics.jsonl``: its own files are never replaced;
- a model is ``M.onnx`` with its card ``M.json`` beside it; a labels table ``T.csv`` (``.jsonl``, ``.parquet``)
  has ``T.meta.json``, ``T.embeddings.npy``, ``T.skipped.txt`` and ``T.csv.parts/`` beside it.

An index or a labels table among the inputs brings the image folder it was made from (its recorded root) into
the folders nothing is written into: its images are read again by search, merges, updates and the app. An export
replaces an existing model only when that model's card names the same checkpoint (by path or content).

Writes themselves go through :mod:`twist_core.io_utils` (a temporary file renamed over the path), which
replaces a symbolic link at the path instead of writing through it; so only the link's own location counts
here, and a link to an input is replaced, never its target.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from twist_core.errors import UserError
from twist_core.io_utils import OUTPUT_MARKER, file_sha256
from twist_core.label.table import FORMATS, labels_paths, skipped_path
from twist_core.layout import (
    CONFIG_FILE,
    CURATION_FILE,
    INFO_TABLE,
    MANIFEST,
    META_FILE,
    RUN_FILES,
    RUN_MARKERS,
)

REPORT = "report"  # a JSON or PNG a command writes on request (--json, --plot, --confusion)
MODEL = "model"  # twist export: M.onnx and its card M.json
TABLE = "table"  # twist label: the table and the files beside it
RUN = "run"  # twist train / finetune: a run folder
INDEX = "index"  # twist index: an index folder
TREE = "tree"  # twist label --export-tree: a folder of links or copies
WORKSPACE = "workspace"  # twist demo: a folder of its own (digits, run, model, labels, index)
FOLDERS = (RUN, INDEX, TREE, WORKSPACE)

TABLE_SIDE_FILES = (".meta.json", ".embeddings.npy", ".skipped.txt")


class OutputError(UserError):
    """An output path that would destroy an input or another command's result; nothing was written."""


@dataclass(frozen=True)
class Output:
    """One output of a command: the option that names it (for the message), its path and what it is."""

    option: str
    path: str | Path | None
    kind: str = REPORT
    source: str | Path | None = None  # a model's checkpoint: an existing model of another is not replaced


def check_outputs(outputs: Sequence[Output], inputs: Iterable[str | Path | None] = (),
                  within: Iterable[str | Path | None] = ()) -> None:
    """Refuse (:class:`OutputError`) an output that is one of ``inputs``, lies in one of the image folders
    ``within`` (or the one an input index or labels table was made from), would replace a file of an index,
    run, model or labels table, or is another output too."""
    given = [i for i in inputs if i]
    inputs_at = {place for i in given for place in (_location(Path(i)), Path(os.path.realpath(i)))}
    roots = [root for i in given if (root := image_root(Path(i)))]
    folders = [Path(os.path.realpath(folder)) for folder in [*within, *roots] if folder]
    claimed: dict[Path, str] = {}
    for output in outputs:
        if not output.path:
            continue
        for path in written_paths(output):
            place = Path(os.path.realpath(path)) if output.kind in FOLDERS else _location(path)  # written into
            reason = (_input_reason(place, inputs_at) or _inside_reason(place, folders)
                      or _owner_reason(place, output.kind) or _other_model_reason(place, output)
                      or _claimed_reason(place, claimed))
            if reason:
                shown = "" if path == Path(output.path) else f" (it writes {path})"
                raise OutputError(f"{output.option} {output.path}{shown}: {reason}; nothing was written, "
                                  "choose another path")
            claimed[place] = output.option


def written_paths(output: Output) -> list[Path]:
    """Every path an output writes: a model's card, a table's side files and work folder too."""
    path = Path(str(output.path))
    if output.kind == MODEL:
        return [path, path.with_suffix(".json")]
    if output.kind == TABLE:
        return [path, *labels_paths(path), skipped_path(path), path.with_name(path.name + ".parts")]
    return [path]


def image_root(path: Path) -> str | None:
    """The image folder an index folder or a labels table was made from, as it records it (None for any other
    input, or one too damaged to say: the command itself reports that)."""
    try:
        if is_index_folder(path):
            generation = json.loads((path / MANIFEST).read_text())["dir"]
            meta = path / Path(str(generation)).name / META_FILE
            with contextlib.closing(sqlite3.connect(f"{meta.resolve().as_uri()}?mode=ro", uri=True)) as db:
                row = db.execute(f"SELECT value FROM {INFO_TABLE} WHERE key = 'root'").fetchone()
            root = json.loads(row[0]) if row else None
        elif path.suffix in FORMATS and path.is_file():
            root = json.loads(labels_paths(path)[1].read_text()).get("root")
        else:
            return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, sqlite3.Error):
        return None
    return root if isinstance(root, str) and root else None


def _location(path: Path) -> Path:
    """Where a write to ``path`` lands: its folder resolved, its last part not (a link there is replaced)."""
    return Path(os.path.realpath(path.parent)) / path.name


def _input_reason(place: Path, inputs_at: set[Path]) -> str | None:
    return "it is one of this command's inputs" if place in inputs_at else None


def _inside_reason(place: Path, folders: list[Path]) -> str | None:
    for folder in folders:
        if place == folder or folder in place.parents:
            return f"it is inside the image folder {folder}, where it would be taken for images"
    return None


def _claimed_reason(place: Path, claimed: dict[Path, str]) -> str | None:
    return f"{claimed[place]} writes the same file" if place in claimed else None


def _owner_reason(place: Path, kind: str) -> str | None:
    """Why ``place`` belongs to an index, state folder, run, model or labels table that ``kind`` must not touch."""
    for folder in ([place] if kind in FOLDERS else []) + list(place.parents):
        if is_index_folder(folder) and not (kind == INDEX and folder == place):
            return f"it is in the index folder {folder}"
        if (folder / CURATION_FILE).is_file() and not (kind == INDEX and folder == place):
            return f"it is in the app's state folder {folder}"
    if kind in FOLDERS:
        return f"{place} is a training run" if kind != RUN and is_run_folder(place) else None
    if is_run_folder(place.parent) and (place.name in RUN_FILES or place.suffix == ".pt"):
        return f"it would replace {place.name} of the training run {place.parent}"
    if kind != MODEL and _is_model_file(place):
        return "it would replace an exported model or its card"
    if kind == MODEL and place.suffix == ".json" and place.exists() and not _is_model_file(place):
        return f"it would replace {place}, which is not a model card"
    if kind != TABLE and _is_table_file(place):
        return "it would replace a labels table of twist label or a file beside it"
    return None


def _other_model_reason(place: Path, output: Output) -> str | None:
    """Why an export would replace the model (or card) of another checkpoint at ``place``; re-exporting the
    checkpoint a model came from (the same file, or a copy of it) over that model is allowed."""
    if output.kind != MODEL or place != _location(Path(str(output.path))):
        return None
    card = _model_card(place.with_suffix(".json")) or {}
    if not card and not place.exists():
        return None
    recorded = card.get("checkpoint")
    if not isinstance(recorded, str) or not recorded:
        return (f"it would replace an exported model whose card ({place.with_suffix('.json').name}) is missing or "
                "does not name the checkpoint it came from")
    if output.source and _same_checkpoint(Path(output.source), Path(recorded), card.get("checkpoint_sha256")):
        return None
    return f"it would replace the model exported from another checkpoint ({recorded})"


def _same_checkpoint(source: Path, recorded: Path, recorded_sha256: object) -> bool:
    if os.path.realpath(source) == os.path.realpath(recorded):
        return True
    try:
        return isinstance(recorded_sha256, str) and file_sha256(source) == recorded_sha256
    except OSError:
        return False


def is_index_folder(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() and ((folder / OUTPUT_MARKER).exists() or any(folder.glob("gen-*")))


def is_run_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and any((folder / name).is_file() for name in RUN_MARKERS)


def _is_model_file(path: Path) -> bool:
    """An exported model (``.onnx`` beside its card) or the card (``.json`` with a model's fields)."""
    if path.suffix == ".onnx":
        return path.is_file()
    return path.suffix == ".json" and _model_card(path) is not None


def _model_card(path: Path) -> dict | None:
    """The model card at ``path`` (a JSON object with a model's fields), or None."""
    try:
        card = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) and {"n_classes", "input_name"} <= card.keys() else None


def _is_table_file(path: Path) -> bool:
    """A labels table (its meta file exists) or one of the files twist label writes beside one."""
    if path.suffix in FORMATS:
        return labels_paths(path)[1].is_file()
    return path.name.endswith(TABLE_SIDE_FILES) and path.exists()
