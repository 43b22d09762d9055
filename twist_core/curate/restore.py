"""``twist restore-state SET_ASIDE.json --index INDEX``: apply curation that was set aside again.

When the index is relabelled by another model, the curation store writes the names, merges, moves,
confirmations and undo log made for the old model's clusters to ``curation-set-aside-*.json`` in its state
folder and stops applying them. Once the index holds that model again (``twist index --update --out INDEX
--model OLD.onnx``), this puts them back exactly as they were, undo log included. Whatever the store holds
then is set aside the same way first, so nothing is lost either way. A file made for another index, or for a
model the index does not hold now, is refused and nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from twist_core.config import AutoConfig, option
from twist_core.curate.curation import CurationError, CurationStore
from twist_core.curate.set_aside import SetAside, read_set_aside
from twist_core.index.metadata import IndexMetadata, meta_path
from twist_core.io_utils import file_sha256


@dataclass
class RestoreConfig(AutoConfig):
    file: str = option(None, "the set-aside file (curation-set-aside-*.json, written beside the curation store)")
    index: str | None = option(None, "index folder the curation was made with (twist index)")
    state_dir: str | None = option(None, "folder of the curation store, as given to twist app; default: the folder "
                                         "the set-aside file is in (where the store wrote it)")


@dataclass(frozen=True)
class Restored:
    """What was put back where, and where the curation the store held before went (None: it held none)."""

    saved: SetAside
    store: Path
    set_aside: Path | None


def restore_state(config: RestoreConfig) -> Restored:
    if not config.file or not config.index:
        raise CurationError("give the set-aside file and the index: twist restore-state SET_ASIDE.json --index INDEX")
    saved = read_set_aside(Path(config.file))  # checked before the store is opened: a bad file changes nothing
    metadata = meta_path(Path(config.index))
    store = CurationStore.for_index(config.index, config.state_dir or Path(config.file).parent,
                                    class_names(metadata), metadata)
    try:
        return Restored(saved, store.path, store.restore(saved))
    finally:
        store.close()


def class_names(metadata: Path) -> list[str]:
    """The class names of the index's model, which say how many clusters there are (none when its model file
    is gone or changed: the clusters are then not checked)."""
    from twist_core.deploy.infer import OnnxModel

    meta = IndexMetadata(metadata)
    try:
        info = meta.info()
    finally:
        meta.close()
    model = info.get("model")
    if not model or not Path(model).is_file() or file_sha256(model) != info.get("model_sha256"):
        return []
    try:
        return OnnxModel(model, device="cpu").class_names
    except (ValueError, OSError):
        return []
