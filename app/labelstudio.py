"""``twist import-labels EXPORT.json --index INDEX``: bring the labels people chose in Label Studio back.

It reads a Label Studio JSON export (Export > JSON) of the tasks the app exported, takes each task's latest
annotation that was not skipped, and applies the chosen names to the curation store as moves, with the
renames given by --rename, in ONE change: the app's Undo takes a whole import back, and the app and its
exports see the labels at once (also while it runs: the store is one SQLite file with transactions).

A task names its image by ``data.twist_id`` (the index id the export wrote), checked against its image URL
(or, with no URL, against ``data.twist_index``, the index the app's export names), or else by the URL alone,
whose path must end with the image's path in the index. An export whose tasks name another index, or a --model
that did not label the index, is refused. A chosen name that matches no cluster is reported and left out:
rename a cluster to it (in the app, or with --rename) and import again. The name ``excluded`` (when no cluster
has it) takes an image out of the dataset, as the app's Exclude does. A malformed task is named and left out;
the others are applied. What the summary quotes from the export is shown with control characters escaped.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from twist_core.commands import run_command
from twist_core.config import AutoConfig, command_parser, option
from twist_core.curate.curation import EXCLUDED, CurationStore
from twist_core.curate.store_file import curation_path
from twist_core.errors import UserError, terminal_safe
from twist_core.index.metadata import IndexMetadata, meta_path
from twist_core.io_utils import file_sha256
from twist_core.report import print_written

EXCLUDE_NAME = "excluded"
SHOWN = 10  # unknown images listed by name in the summary
MAX_ID = 2**63  # index ids are SQLite integers


@dataclass
class ImportLabelsConfig(AutoConfig):
    file: str = option(None, "Label Studio JSON export of the tasks (Export > JSON in the project)")
    index: str | None = option(None, "index folder the tasks were exported from (twist index)")
    state_dir: str | None = option(None, "folder of the curation store, as given to twist app; default: the index")
    model: str | None = option(None, "exported model whose class names the clusters start with; default: the "
                                     "model the index was built with")
    rename: list[str] = field(default_factory=list, metadata={
        "help": "CLUSTER=NAME renames a cluster (its number or current name) in the same change, e.g. to a label "
                "name people added in Label Studio"})
    from_name: str = option("label", "name of the Choices tag to read, as in the labelling config")
    dry_run: bool = option(False, "report what would change and change nothing")


class LabelImportError(UserError):
    """The export or the options cannot be used as given; the message says why."""


class TaskError(ValueError):
    """One task of the export cannot be read; it is named in the summary and left out."""


@dataclass(frozen=True)
class Choice:
    """What one task says: the image it names (None if unknown) and the label chosen, or why there is none."""

    task: str
    image_id: int | None
    name: str | None
    outcome: str  # chosen, not annotated, cancelled, no single choice, unknown image, malformed


@dataclass
class ImportPlan:
    """The change an import makes and what it leaves out."""

    tasks: int = 0
    moves: dict[int, int] = field(default_factory=dict)
    renames: dict[int, str] = field(default_factory=dict)
    unchanged: int = 0
    skipped: Counter = field(default_factory=Counter)
    unknown_names: Counter = field(default_factory=Counter)
    unknown_images: list[str] = field(default_factory=list)
    conflicting: list[int] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)  # each: the task and what is wrong with it


def load_export(path: Path) -> list[Any]:
    """The tasks of a Label Studio JSON export; anything else (CSV, JSON-MIN, tasks to import) is refused."""
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LabelImportError(f"no file {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise LabelImportError(f"{path} is not JSON ({error}); export the project as JSON in Label Studio") from None
    if not isinstance(tasks, list) or (tasks and not any(is_task(t) for t in tasks)):
        raise LabelImportError(f"{path} is not a Label Studio JSON export (a list of tasks with 'data'); "
                               "export the project with the JSON format, not JSON-MIN or CSV")
    if tasks and not any(is_task(t) and "annotations" in t for t in tasks):
        raise LabelImportError(f"{path} holds tasks without annotations: it is a file to import into Label "
                               "Studio, not an export from it")
    return tasks


def is_task(task: Any) -> bool:
    """A Label Studio task: an object whose ``data`` is one (any other entry is a malformed task, left out)."""
    return isinstance(task, dict) and isinstance(task.get("data"), dict)


def chosen_name(task: dict[str, Any], from_name: str) -> tuple[str | None, str]:
    """The label of the task's latest annotation that was not skipped, or why there is none."""
    listed = task.get("annotations") or []
    if not isinstance(listed, list):
        raise TaskError("its annotations are not a list")
    annotations = [a for a in listed if isinstance(a, dict)]
    kept = [a for a in annotations if not a.get("was_cancelled")]
    if not kept:
        return None, "cancelled" if annotations else "not annotated"
    latest = max(kept, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""),
                                      a["id"] if type(a.get("id")) is int else -1))
    results = latest.get("result") or []
    if not isinstance(results, list):
        raise TaskError("an annotation's result is not a list")
    picked = [choices_of(result) for result in results
              if isinstance(result, dict) and result.get("type") == "choices" and result.get("from_name") == from_name]
    names = [name for choices in picked for name in choices]
    if len(names) != 1 or not isinstance(names[0], str):
        return None, "no single choice"
    return names[0], "chosen"


def choices_of(result: dict[str, Any]) -> list[Any]:
    value = result.get("value")
    choices = value.get("choices") if isinstance(value, dict) else None
    return choices if isinstance(choices, list) else [None]  # a malformed result counts as no single choice


def url_path(url: Any) -> str | None:
    """The file path an image URL names: the ``d`` query value of Label Studio's local files, else its path."""
    if not isinstance(url, str) or not url:
        return None
    parts = urlsplit(url)
    served = parse_qs(parts.query).get("d")
    return (served[0] if served else unquote(parts.path)).strip("/") or None


def names_path(url_file: str | None, path: str) -> bool:
    return url_file is None or url_file == path or url_file.endswith("/" + path)


def suffixes(path: str) -> list[str]:
    """``a/b/c.png`` -> ``a/b/c.png``, ``b/c.png``, ``c.png``: the longest index path a URL may end with first."""
    parts = path.split("/")
    return ["/".join(parts[i:]) for i in range(len(parts))]


def as_id(value: Any) -> Any:
    """An index id as the export wrote it: a number, or digits in a string; anything else is kept as given."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) < 20:
        return int(value)
    return value


def is_index_id(value: Any) -> bool:
    """Whether ``value`` can be an index id at all (10**30 cannot: it is reported as an unknown image)."""
    return type(value) is int and 0 <= value < MAX_ID


def task_label(number: int, task: Any) -> str:
    """How the summary names a task: its place in the file and its Label Studio id."""
    return f"task #{number}" + (f" (id {task['id']})" if isinstance(task, dict) and type(task.get("id")) is int
                                else "")


@dataclass(frozen=True)
class TaskImage:
    """What a task says about its image: the file its URL names, the index id and the index it names."""

    url_file: str | None
    twist_id: Any
    twist_index: str | None


def task_image(task: Any) -> TaskImage:
    if not isinstance(task, dict):
        raise TaskError("it is not an object")
    data = task.get("data")
    if not isinstance(data, dict):
        raise TaskError("its data is not an object")
    named = data.get("twist_index")
    if named is not None and not isinstance(named, str):
        raise TaskError("its twist_index is not text")
    try:
        url_file = url_path(data.get("image"))
    except ValueError as error:
        raise TaskError(f"its image URL cannot be read ({error})") from None
    return TaskImage(url_file, as_id(data.get("twist_id")), named)


def find_images(images: Sequence[TaskImage], meta: IndexMetadata, uid: str | None) -> list[tuple[int | None, str]]:
    """Each task's index id (None if it names no indexed image, or an id its URL disagrees with, or an id with
    no URL from a task that does not name this index) and how the summary names it."""
    ids = [i.twist_id for i in images if is_index_id(i.twist_id)]
    paths = {i: row["path"] for i, row in meta.rows(ids).items()}
    by_path = meta.ids_for_paths(sorted({s for i in images if i.twist_id is None and i.url_file
                                         for s in suffixes(i.url_file)}))
    found: list[tuple[int | None, str]] = []
    for image in images:
        url_file, twist_id = image.url_file, image.twist_id
        if twist_id is not None:
            known = is_index_id(twist_id) and twist_id in paths and (
                names_path(url_file, paths[twist_id]) if url_file else uid is not None and image.twist_index == uid)
            found.append((twist_id if known else None, f"id {twist_id}" + (
                f" ({url_file})" if url_file else " (no image URL, and the task does not name this index)")))
        else:
            hit = next((by_path[s] for s in suffixes(url_file) if s in by_path), None) if url_file else None
            found.append((hit, url_file or "a task with no image URL"))
    return found


def refuse_other_index(tasks: Sequence[Any], uid: str | None, source: str, index: str) -> None:
    """An export whose tasks name another index (``twist_index``) belongs to that index: refused whole."""
    foreign = [(number, task) for number, task in enumerate(tasks, 1)
               if uid and is_task(task) and isinstance(task["data"].get("twist_index"), str)
               and task["data"]["twist_index"] != uid]
    if foreign:
        number, task = foreign[0]
        raise LabelImportError(
            f"{source} was exported from another index (uid {terminal_safe(task['data']['twist_index'][:12])}, "
            f"{task_label(number, task)}" + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "")
            + f"), not {index} (uid {uid[:12]}): import it with the index it came from; nothing was changed")


def normalized(name: str) -> str:
    return " ".join(name.split()).lower()


def parse_renames(values: Sequence[str], names: dict[int, str]) -> dict[int, str]:
    """``CLUSTER=NAME`` options -> {cluster: new name}; CLUSTER is a number or a current name."""
    by_name = {normalized(n): c for c, n in names.items()}
    renames: dict[int, str] = {}
    for value in values:
        cluster, sep, name = value.partition("=")
        cluster, name = cluster.strip(), " ".join(name.split())
        if not sep or not cluster or not name:
            raise LabelImportError(f"--rename expects CLUSTER=NAME, got {value!r}")
        number = int(cluster) if cluster.isdigit() else by_name.get(normalized(cluster))
        if number not in names:
            raise LabelImportError(f"--rename {value!r}: there is no cluster {cluster!r}")
        if names[number] != name:
            renames[number] = name
    return renames


def name_lookup(names: dict[int, str], renames: dict[int, str]) -> dict[str, int]:
    """Label name -> cluster after the renames; a renamed cluster's old name still finds it if no one took it."""
    final = {**names, **renames}
    lookup = {normalized(names[c]): c for c in renames}
    lookup.update({normalized(n): c for c, n in final.items()})
    if normalized(EXCLUDE_NAME) not in lookup:
        lookup[normalized(EXCLUDE_NAME)] = EXCLUDED
    return lookup


def read_choices(tasks: Sequence[Any], meta: IndexMetadata, from_name: str, uid: str | None
                 ) -> list[Choice]:
    """Each task's choice; a task that cannot be read is a ``malformed`` choice naming it and why."""
    read: list[tuple[TaskImage, str | None, str]] = []
    malformed: dict[int, str] = {}
    for number, task in enumerate(tasks, 1):
        try:
            read.append((task_image(task), *chosen_name(task, from_name)))
        except (TaskError, TypeError, AttributeError, ValueError) as error:
            malformed[number] = f"{task_label(number, task)}: {error}"
            read.append((TaskImage(None, None, None), None, "malformed"))
    choices = []
    for number, ((_, name, outcome), (image_id, reference)) in enumerate(
            zip(read, find_images([image for image, _, _ in read], meta, uid), strict=True), 1):
        if outcome == "chosen" and image_id is None:
            outcome = "unknown image"
        choices.append(Choice(malformed.get(number, reference), image_id, name, outcome))
    return choices


def plan_import(choices: Sequence[Choice], store: CurationStore, renames: dict[int, str]) -> ImportPlan:
    """Which images move where: one target per image (several tasks that disagree leave it alone)."""
    plan = ImportPlan(tasks=len(choices), renames=renames)
    lookup = name_lookup(store.names(), renames)
    targets: dict[int, set[int]] = {}
    for choice in choices:
        if choice.outcome == "malformed":
            plan.malformed.append(terminal_safe(choice.task))
        elif choice.outcome == "unknown image":
            plan.unknown_images.append(terminal_safe(choice.task))
        elif choice.outcome != "chosen":
            plan.skipped[choice.outcome] += 1
        elif normalized(choice.name or "") not in lookup:
            plan.unknown_names[choice.name] += 1
        else:
            targets.setdefault(choice.image_id, set()).add(lookup[normalized(choice.name or "")])  # type: ignore[arg-type]
    current = store.records(list(targets))
    final = {c: c if c == EXCLUDED else store.merged_into(c) for c in set(lookup.values())}
    for image_id, wanted in sorted(targets.items()):
        if len(wanted) > 1:
            plan.conflicting.append(image_id)
            continue
        target = wanted.pop()
        if current[image_id].label == final[target]:
            plan.unchanged += 1
        else:
            plan.moves[image_id] = target
    return plan


def describe(plan: ImportPlan, source: str) -> str:
    """The one-line undo-log entry of an import."""
    parts = [f"{len(plan.moves)} label(s)"] + [f"renamed cluster {c} to {n!r}" for c, n in plan.renames.items()]
    return f"imported from Label Studio ({source}): " + ", ".join(parts)


def summary_lines(plan: ImportPlan, applied: bool) -> list[str]:
    verb = "applied" if applied else "would apply (dry run)"
    lines = [f"read {plan.tasks} task(s)",
             f"{verb}: {len(plan.moves)} image(s) moved, {len(plan.renames)} cluster(s) renamed"
             + (" - one change: Undo in the app takes it back" if applied and (plan.moves or plan.renames) else ""),
             f"unchanged: {plan.unchanged} image(s) already had the chosen label",
             "skipped: " + ", ".join(f"{plan.skipped[k]} {k}" for k in ("not annotated", "cancelled",
                                                                         "no single choice"))]
    if plan.conflicting:
        lines.append(f"conflicting: {len(plan.conflicting)} image(s) given different labels by different tasks, "
                     f"left as they were (ids {', '.join(map(str, plan.conflicting[:SHOWN]))})")
    if plan.unknown_names:
        names = ", ".join(f"{n!r} ({k} task(s))" for n, k in sorted(plan.unknown_names.items()))
        lines.append(f"unknown label names, not applied: {names}; rename a cluster to such a name (in the app, "
                     "or --rename CLUSTER=NAME) and import again")
    if plan.malformed:
        listed = "; ".join(plan.malformed[:SHOWN]) + ("; ..." if len(plan.malformed) > SHOWN else "")
        lines.append(f"warning: {len(plan.malformed)} malformed task(s) left out ({listed})")
    shown = ", ".join(plan.unknown_images[:SHOWN]) + (", ..." if len(plan.unknown_images) > SHOWN else "")
    lines.append(f"unknown images: {len(plan.unknown_images)}" + (f" ({shown})" if shown else ""))
    return [terminal_safe(line, limit=100_000) for line in lines]


def open_index(config: ImportLabelsConfig) -> tuple[IndexMetadata, Path, list[str]]:
    """The index's metadata, its path and the class names of the model that labelled it (--model must be that
    model: another one's clusters would be applied to this index's images)."""
    index_dir = Path(config.index or "")
    metadata = meta_path(index_dir)
    meta = IndexMetadata(metadata)
    try:
        info = meta.info()
        model = config.model or info.get("model")
        if not model:
            raise LabelImportError("the index records no model; give --model (the model the index was built with)")
        check_model(Path(model), info, index_dir, given=bool(config.model))
        from twist_core.deploy.infer import OnnxModel

        return meta, metadata, OnnxModel(model, device="cpu").class_names
    except BaseException:
        meta.close()
        raise


def check_model(model: Path, info: dict[str, Any], index_dir: Path, given: bool) -> None:
    """Refuse a model file that is not the one whose fingerprint the index recorded when it was labelled."""
    if not model.is_file():
        where = "" if given else ", where the index's model was: give --model (the model the index was built with)"
        raise LabelImportError(f"no model at {model}{where}")
    recorded = info.get("model_sha256")
    if recorded is None or file_sha256(model) == recorded:
        return
    if given:
        raise LabelImportError(f"--model {model} did not label {index_dir}: its labels come from {info.get('model')} "
                               f"(model {recorded[:12]}), whose clusters the export's names must be applied to; give "
                               "that model, or leave --model out")
    raise LabelImportError(f"{model} changed since it labelled {index_dir} (model {recorded[:12]}): give the model "
                           "the index was labelled with as --model")


def import_labels(config: ImportLabelsConfig) -> ImportPlan:
    """Plan the import and apply it as one change (unless a dry run, or nothing changes)."""
    if not config.file or not config.index:
        raise LabelImportError("give the export and the index: twist import-labels EXPORT.json --index INDEX")
    tasks = load_export(Path(config.file))
    meta, metadata, names = open_index(config)
    try:
        uid = meta.info().get("uid")
        refuse_other_index(tasks, uid, config.file, config.index)
        store = CurationStore.for_index(config.index, config.state_dir, names, metadata)
        try:
            plan = plan_import(read_choices(tasks, meta, config.from_name, uid), store,
                               parse_renames(config.rename, store.names()))
            if not config.dry_run and (plan.moves or plan.renames):
                store.relabel(describe(plan, Path(config.file).name), plan.moves, plan.renames)
            return plan
        finally:
            store.close()
    finally:
        meta.close()


def import_and_print(config: ImportLabelsConfig) -> int:
    plan = import_labels(config)
    print("\n".join(summary_lines(plan, applied=not config.dry_run)))
    if not config.dry_run and (plan.moves or plan.renames):
        print_written([(curation_path(config.index, config.state_dir),
                        "the app's curation store: the import is one change, Undo takes it back")])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("twist import-labels", __doc__, ImportLabelsConfig, positional=("file",))
    return run_command("twist import-labels", parser, ImportLabelsConfig, argv, import_and_print)


if __name__ == "__main__":
    sys.exit(main())
