"""Curation set aside: when the index is relabelled by another model, the curation store writes what it held
for the old model's clusters to ``curation-set-aside-*.json`` beside it; :func:`read_set_aside` reads such a
file back, checked, for ``twist restore-state`` (:meth:`CurationStore.restore`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twist_core.curate.store_file import CurationError

SET_ASIDE_FILE = "curation-set-aside-{model}-{time}.json"  # curation made for a model the index no longer uses
# The tables an undo entry may restore, with each one's key and value columns.
UNDO_TABLES = {"names": ("cluster", "name"), "merges": ("cluster", "into_cluster"),
               "overrides": ("image_id", "cluster"), "confirmed": ("image_id", "cluster")}


def describe_held(held: Mapping[str, int]) -> str:
    """``3 name(s), 1 merge(s), ...``: the kinds a store holds, empty when it holds nothing."""
    return ", ".join(f"{n} {kind}" for kind, n in held.items() if n)


@dataclass(frozen=True)
class SetAside:
    """A set-aside file (``curation-set-aside-*.json``) read back and checked: what :meth:`CurationStore.restore`
    puts back, keyed as the store keys it."""

    model_sha256: str
    index_uid: str | None
    names: dict[int, str]
    merges: dict[int, int]
    moves: dict[int, int]  # image id -> cluster
    confirmed: dict[int, int]
    undo_log: list[tuple[str, str, dict[str, dict[str, Any]]]]  # action, at, previous
    learned_by: list[Any]

    def describe(self) -> str:
        return describe_held({"name(s)": len(self.names), "merge(s)": len(self.merges), "move(s)": len(self.moves),
                              "confirmation(s)": len(self.confirmed), "undo step(s)": len(self.undo_log)})


def read_set_aside(path: Path) -> SetAside:
    """The set-aside file at ``path``; anything else (not JSON, a field of the wrong kind, an id SQLite cannot
    hold) is refused in one line naming the file."""
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(saved, dict) or not isinstance(saved.get("model_sha256"), str):
            raise ValueError("no model_sha256: it was not written by a curation store")
        uid = saved.get("index_uid")
        return SetAside(
            saved["model_sha256"], uid if isinstance(uid, str) else None,
            {_key(c): _typed(n, str) for c, n in _field(saved, "names", dict).items()},
            {_key(c): _typed(t, int) for c, t in _field(saved, "merges", dict).items()},
            _image_rows(_field(saved, "moves", list)), _image_rows(_field(saved, "confirmed", list)),
            [_undo_entry(entry) for entry in _field(saved, "undo_log", list)],
            saved.get("learned_by") if isinstance(saved.get("learned_by"), list) else [])
    except FileNotFoundError:
        raise CurationError(f"no file {path}") from None
    except KeyError as error:
        raise CurationError(f"{path} is not a set-aside curation file (an entry lacks {error}); nothing was "
                            "changed") from None
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError, RecursionError) as error:
        raise CurationError(f"{path} is not a set-aside curation file ({error}); nothing was changed") from None


def _field(saved: dict[str, Any], name: str, kind: type) -> Any:
    return _typed(saved.get(name), kind, name)


def _typed(value: Any, kind: type, what: str = "a value") -> Any:
    """``value`` if it is a ``kind`` (an int SQLite can hold; never a bool), else ValueError."""
    if type(value) is not kind or (kind is int and not -(2**63) <= value < 2**63):
        raise ValueError(f"{what} is {str(value)[:40]!r}, not {kind.__name__}" + (" of 64 bits" if kind is int else ""))
    return value


def _key(text: str) -> int:
    """A JSON object key holding a cluster number or an image id."""
    return _typed(int(text) if text.lstrip("-").isdigit() else text, int, "a key")


def _image_rows(rows: list[Any]) -> dict[int, int]:
    return {_typed(row["image_id"], int, "an image id"): _typed(row["cluster"], int, "a cluster") for row in rows}


def _undo_entry(entry: dict[str, Any]) -> tuple[str, str, dict[str, dict[str, Any]]]:
    """An undo-log entry: what it restores must name tables and values the store has."""
    previous = _typed(entry["previous"], dict, "an undo entry")
    for table, values in previous.items():
        if table not in UNDO_TABLES:
            raise ValueError(f"an undo entry names no table of the store ({table[:40]!r})")
        kind = str if table == "names" else int
        for key, value in _typed(values, dict, "an undo entry").items():
            _key(key)
            if value is not None:
                _typed(value, kind, "an undo entry's value")
    return _typed(entry["action"], str, "an action"), _typed(entry["at"], str, "a time"), previous
