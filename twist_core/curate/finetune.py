"""``twist finetune RUN --index IX``: learn from the corrections a person made in the app, into a NEW run.

The images whose cluster a person set or confirmed (moved, merged, or confirmed on a page or a selection)
become labels: training continues from RUN's weights with a cross-entropy term on them plus the TWIST loss
on every image, as the paper's semi-supervised fine-tuning stage. K and the class names follow the curated
clusters: a merge drops the merged clusters' rows of the head's last layer (the target keeps its row), and
excluded images are left out of both terms. RUN is never modified; the new run folder holds config.json,
last.pt, metrics.jsonl, ``class_names.txt`` (which ``twist export`` picks up) and ``finetune.json``.
A fine-tune that was stopped (killed, power cut) resumes from its checkpoint when the same command is run
again, with the labels it started with (kept in ``finetune-plan.json``); a finished one is refused.
Everything RUN trained trains on: a ResNet end to end; with the patches backbone the patch dictionary stays
frozen and the BatchNorm over its pooled codes plus the head train, whose first hidden layer is the embedding
(so the app's neighbours change too).

The labels come from the app's curation store (``--index``, with ``--state-dir`` when the app used one) or a
CSV (``--labels``): ``path`` and ``label`` (a cluster number of RUN) columns, and optionally ``label_name``,
``status`` and ``predicted``, as the app's CSV export writes them. A CSV without ``status`` labels every row.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from twist_core.config import AUTO, AutoConfig, auto_option, option
from twist_core.curate.store_file import curation_path
from twist_core.errors import UserError
from twist_core.io_utils import atomic_write_text, file_sha256, path_from_text
from twist_core.layout import (
    CHECKPOINT_FILE,
    CLASS_NAMES_FILE,
    DONE_FILE,
    FINETUNE_PLAN_FILE,
    FINETUNE_REPORT_FILE,
)
from twist_core.model.checkpoint import load_checkpoint
from twist_core.train.budget import check_budget
from twist_core.train.loop import train
from twist_core.train.options import TrainConfig
from twist_core.train.run import Run, Supervision

CURATED_STATUSES = ("moved", "merged", "confirmed")  # rows of the app's CSV whose label a person set
EXCLUDED_STATUS = "excluded"


@dataclass
class FinetuneConfig(AutoConfig):
    run: str = option(None, "run folder to continue from (never modified)")
    out: str | None = option(None, "new run folder; default: RUN-finetuned")
    index: str | None = option(None, "index folder the app curated (its curation.sqlite gives the labels)")
    state_dir: str | None = option(None, "the app's --state-dir, when it had one (default: the index folder)")
    labels: str | None = option(None, "instead of --index: a CSV with path and label (cluster number of RUN) "
                                      "columns, optionally label_name, status and predicted (the app's export); "
                                      "relative paths are under --data")
    data: str | None = option(None, "image folder to train on; default: RUN's")
    epochs: int = option(20, "fine-tuning epochs")
    time_budget: str | None = option(None, "fit the fine-tuning to this wall-clock time (e.g. 5m); overrides --epochs")
    lr: float = option(0.05, "base learning rate per 256 images (SGD; the run's optimiser otherwise)")
    warmup_epochs: float = option(1.0, "linear warm-up before the cosine decay")
    supervised_weight: float = option(1.0, "weight of the cross-entropy on the labelled images")
    labelled_per_step: int = option(64, "labelled images (drawn with replacement) added to every step's batch")
    self_label_fraction: float = option(0.0, "share of the final steps in the self-labelling stage (0 = off)")
    eval_data: str | None = option(None, "class-folder tree to evaluate on (ACC/NMI/ARI/kNN) during training")
    eval_every: int = option(5, "evaluate every N epochs when --eval-data is given")
    seed: int = option(0, "random seed (data order, augmentation, labelled draws)")
    workers: int | str = auto_option(-1, "decoding worker processes; auto: the run's")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    progress: bool = option(True, "show a progress bar")


class FinetuneError(UserError, ValueError):
    """The options or the curation cannot make a fine-tuning run; the message says what to change."""


@dataclass
class Curation:
    """What a person decided, in RUN's cluster numbers.

    ``names``: every cluster that survives (not merged away) -> its name, which is the new run's K and order;
    ``labels``: image path -> cluster, for the images whose cluster was set or confirmed;
    ``excluded``: image paths taken out of the data set. Paths are absolute, or relative to the data folder.
    """

    names: dict[int, str]
    labels: dict[str, int]
    excluded: set[str]


def curation_from_store(index_dir: Path, state_dir: Path | None, n_classes: int) -> tuple[Curation, Path]:
    """The curation store's decisions, with image paths absolute (the index root joined)."""
    from twist_core.curate.curation import EXCLUDED, CurationError, CurationStore
    from twist_core.index.metadata import IndexMetadata, IndexUserError, meta_path

    store_path = curation_path(index_dir, state_dir)
    if not store_path.is_file():
        raise FinetuneError(f"no curation at {store_path}: open the index in the app (twist app --index "
                            f"{index_dir}), move or confirm some images, then run this again"
                            + ("" if state_dir else ", with --state-dir if the app used one"))
    try:
        metadata = meta_path(index_dir)
        meta = IndexMetadata(metadata)
        root, predicted_names = Path(meta.info()["root"]), {c["cluster"]: c["name"] for c in meta.cluster_summary()}
        meta.close()
        default = [predicted_names.get(c) or f"cluster_{c}" for c in range(n_classes)]
        store = CurationStore.for_index(index_dir, state_dir, default, metadata)
    except (IndexUserError, CurationError) as error:
        raise FinetuneError(str(error)) from None
    try:
        merged = store.merges()
        names = {c: n for c, n in store.names().items() if c not in merged and 0 <= c < n_classes}
        labels, excluded = {}, set()
        for record in store.curated_records():
            path = str(root / path_from_text(record.path))
            if record.label == EXCLUDED:
                excluded.add(path)
            elif record.label is not None:
                labels[path] = int(record.label)
    finally:
        store.close()
    return Curation(names, labels, excluded), root


def check_index_model(index_dir: Path, run: Path) -> None:
    """Refuse an index that RUN's own export did not label, before anything is read or written: its cluster
    numbers would be another model's (a K that differs failed half-way; an equal K was learned silently)."""
    from twist_core.index.metadata import IndexMetadata, IndexUserError, meta_path

    try:
        meta = IndexMetadata(meta_path(index_dir))
    except IndexUserError as error:
        raise FinetuneError(str(error)) from None
    try:
        info = meta.info()
    finally:
        meta.close()
    exported_from = index_checkpoint(info)
    model = info.get("model") or "its model"
    if exported_from is None:
        raise FinetuneError(f"--index {index_dir}: cannot tell which run its labels come from ({model} is gone or "
                            "changed, and so is the labels table it was built from): put that model back, or give "
                            "the labels as a CSV exported from the app (--labels); nothing was written")
    ours = file_sha256(run / CHECKPOINT_FILE)
    if exported_from != ours:
        raise FinetuneError(f"--index {index_dir} was labelled by {model}, which is not an export of {run} (checkpoint "
                            f"{exported_from[:12]}, not {ours[:12]}): fine-tune the run that model came from, or "
                            f"relabel the index with an export of this run (twist export {run} --out M.onnx; twist "
                            f"index --update --out {index_dir} --model M.onnx); nothing was written")


def index_checkpoint(info: dict[str, Any]) -> str | None:
    """The fingerprint of the checkpoint the index's model was exported from: its model card, or else the
    labels table it was built from; None when neither is there as it was."""
    from twist_core.deploy.infer import OnnxModel
    from twist_core.label.table import read_labels_meta

    path, recorded = info.get("model"), info.get("model_sha256")
    if path and Path(path).is_file() and recorded in (None, file_sha256(path)):  # None: an index from before
        try:
            return OnnxModel(path, device="cpu").card.get("checkpoint_sha256")
        except (ValueError, OSError):
            pass
    source = info.get("source")
    try:
        table = read_labels_meta(source) if source else {}
    except (OSError, ValueError):
        table = {}
    if not isinstance(table, dict):
        return None
    return table.get("checkpoint_sha256") if recorded and table.get("model_sha256") == recorded else None


def record_learning(index_dir: Path, state_dir: Path | None, run: Path, images: int) -> None:
    """Note in the app's curation store that ``run`` learned from it: when the index is relabelled by the
    new model, the curation set aside says it was learned from, not lost."""
    from twist_core.curate.curation import CurationStore

    store = CurationStore.for_index(index_dir, state_dir)
    try:
        store.record_learning(str(run.resolve()), images)
    finally:
        store.close()


def curation_from_csv(table: Path, n_classes: int) -> Curation:
    """The app's CSV export (or any CSV with path and label columns) as decisions; one line on bad input."""
    try:
        with open(table, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise FinetuneError(f"--labels {table}: cannot read it ({error})") from None
    columns = set(rows[0]) if rows else set()
    if not {"path", "label"} <= columns:
        raise FinetuneError(f"--labels {table}: needs a header with path and label columns (found: "
                            f"{', '.join(sorted(c for c in columns if c)) or 'no rows'})")
    names: dict[int, str] = {c: f"cluster_{c}" for c in range(n_classes)}
    labels, excluded = {}, set()
    for line, row in enumerate(rows, start=2):
        status = (row.get("status") or "").strip()
        path = path_from_text(_cell(row["path"]))
        if status == EXCLUDED_STATUS:
            excluded.add(path)
            continue
        cluster = _cluster(row["label"], n_classes, table, line)
        if row.get("label_name"):
            names[cluster] = _cell(row["label_name"]).strip() or names[cluster]
        if "status" not in columns or status in CURATED_STATUSES:
            labels[path] = cluster
        if row.get("predicted", "").strip().isdigit() and int(row["predicted"]) != cluster and status == "merged":
            names.pop(int(row["predicted"]), None)  # a merged-away cluster: its images carry the target's label
    return Curation(names, labels, excluded)


def _cell(text: str) -> str:
    """Undo the leading quote the app's export puts before cells a spreadsheet would run as formulas."""
    return text[1:] if text.startswith("'") and text[1:2] in ("=", "+", "-", "@", "\t", "\r") else text


def _cluster(value: str, n_classes: int, table: Path, line: int) -> int:
    text = (value or "").strip()
    if not text.lstrip("-").isdigit() or not 0 <= int(text) < n_classes:
        raise FinetuneError(f"--labels {table}, line {line}: label {text!r} is not a cluster of the run "
                            f"(0 to {n_classes - 1})")
    return int(text)


def head_rows(state: dict[str, torch.Tensor], keep: list[int]) -> dict[str, torch.Tensor]:
    """The weights with only the ``keep`` rows of the head's output layer and of the logit BatchNorm, without
    the coarse heads (the curated clusters replace the grouping they stood for) and the over-clustering head
    (the labelled images now teach the clusters)."""
    outputs = ("head.mlp.6.weight", "head.mlp.6.bias", "head.logit_norm.running_mean", "head.logit_norm.running_var")
    rows = torch.tensor(keep, dtype=torch.long)
    return {name: tensor.index_select(0, rows).clone() if name in outputs else tensor
            for name, tensor in state.items() if not name.startswith(("coarse.", "overcluster."))}


def file_positions(curation: Curation, data: Path, files: list[str]) -> tuple[dict[int, int], set[int], int]:
    """Curated paths as positions in the run's file list: (labelled position -> cluster, excluded, not found)."""
    roots = (os.path.abspath(data), os.path.realpath(data))  # the index holds its root resolved, a run maybe not
    position = {name: i for i, name in enumerate(files)}

    def find(path: str) -> int | None:
        absolute = os.path.normpath(os.path.join(roots[0], path))  # an absolute path stays as it is
        found = (position.get(Path(os.path.relpath(absolute, root)).as_posix()) for root in roots)
        return next((i for i in found if i is not None), None)

    labelled = {find(path): cluster for path, cluster in curation.labels.items()}
    excluded = {find(path) for path in curation.excluded}
    missing = sum(1 for i in labelled if i is None) + sum(1 for i in excluded if i is None)
    return ({i: c for i, c in labelled.items() if i is not None}, {i for i in excluded if i is not None},
            missing)


def labelled_draws(run: Run, labelled: dict[int, int], new_cluster: dict[int, int], per_step: int,
                   seed: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """A draw of ``per_step`` labelled images (with replacement), from the RAM cache or decoded now."""
    usable = [i for i in sorted(labelled) if i not in run.skipped]
    positions = torch.tensor(usable, dtype=torch.long)
    targets = torch.tensor([new_cluster[labelled[i]] for i in usable], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed * 7919 + run.ctx.rank)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        picks = torch.randint(0, len(usable), (per_step,), generator=generator)
        chosen = positions[picks]
        if run.cache is not None:
            return run.cache[chosen], targets[picks]
        return torch.stack([run.dataset[int(i)][1] for i in chosen]), targets[picks]

    return draw


def train_config(config: FinetuneConfig, saved: dict[str, Any], k: int) -> TrainConfig:
    """RUN's configuration (architecture, sizes, loss weights) with this session's length, data and K."""
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    base = TrainConfig(**{k_: v for k_, v in saved.items() if k_ in known})
    return dataclasses.replace(
        base, data=config.data or saved["data"], out=str(config.out), classes=k, coarse_classes="",
        overcluster=0,
        epochs=config.epochs,
        time_budget=config.time_budget, lr=config.lr, warmup_epochs=config.warmup_epochs,
        self_label_fraction=config.self_label_fraction, eval_data=config.eval_data, eval_every=config.eval_every,
        seed=config.seed, workers=base.workers if config.workers == AUTO else config.workers, device=config.device,
        progress=config.progress, resume=False, init=None, recipe="default")


def check_options(config: FinetuneConfig) -> None:
    if not config.run:
        raise FinetuneError("give the run to fine-tune (RUN)")
    if bool(config.index) == bool(config.labels):
        raise FinetuneError("give the curated labels: --index INDEX (the app's curation) or --labels CSV, one of them")
    if not (Path(config.run) / CHECKPOINT_FILE).is_file():
        raise FinetuneError(f"no run at {config.run} (no {CHECKPOINT_FILE})")
    if Path(config.out or "").resolve() == Path(config.run).resolve():
        raise FinetuneError("--out must be a new folder: fine-tuning never modifies RUN")
    out = Path(str(config.out))
    if (out / CHECKPOINT_FILE).exists():
        if (out / DONE_FILE).exists():
            raise FinetuneError(f"{config.out} holds a finished fine-tune: export it (twist export {config.out}) or "
                                "choose another --out (nothing was changed)")
        if saved_learning_set(out, Path(config.run)) is None:
            raise FinetuneError(f"{config.out} already holds a run: choose another --out (nothing was changed)")
    for name in ("epochs", "labelled_per_step", "eval_every"):
        if getattr(config, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} {getattr(config, name)}: must be at least 1")
    if config.supervised_weight < 0:
        raise FinetuneError(f"--supervised-weight {config.supervised_weight}: must be 0 or more")
    try:
        check_budget(config.time_budget)
    except ValueError as error:
        raise FinetuneError(f"--time-budget: {error}") from None


@dataclass
class LearningSet:
    """What one fine-tune learns from, in positions of the run's file list and RUN's cluster numbers."""

    source_run: str
    names: dict[int, str]  # surviving cluster -> name, in the new run's order
    labelled: dict[int, int]  # file position -> cluster
    excluded: set[int]
    missing: int

    @property
    def keep(self) -> list[int]:
        return sorted(self.names)

    def new_cluster(self) -> dict[int, int]:
        """RUN's surviving cluster -> its number in the new run (surviving clusters keep their order)."""
        return {old: new for new, old in enumerate(self.keep)}

    def to_json(self) -> str:
        return json.dumps({"source_run": self.source_run, "names": {str(c): n for c, n in self.names.items()},
                           "labelled": sorted(self.labelled.items()), "excluded": sorted(self.excluded),
                           "missing": self.missing}) + "\n"


def saved_learning_set(out: Path, run: Path) -> LearningSet | None:
    """What a fine-tune of ``run`` started in ``out`` learns from (None: none, or one of another run)."""
    try:
        saved = json.loads((out / FINETUNE_PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None
    if saved.get("source_run") != str(run.resolve()):
        return None
    return LearningSet(saved["source_run"], {int(c): n for c, n in saved["names"].items()},
                {int(i): int(c) for i, c in saved["labelled"]}, {int(i) for i in saved["excluded"]},
                int(saved["missing"]))


def new_learning_set(config: FinetuneConfig, n_classes: int, data: Path) -> LearningSet:
    """The curation's decisions (the app's store or a CSV) as what the fine-tune learns from; refused when nothing
    is labelled."""
    from twist_core.data.folder import require_images

    if config.index:
        check_index_model(Path(config.index), Path(config.run))
        curation, _ = curation_from_store(Path(config.index), Path(config.state_dir) if config.state_dir else None,
                                          n_classes)
    else:
        curation = curation_from_csv(Path(config.labels), n_classes)  # type: ignore[arg-type]
    labelled, excluded, missing = file_positions(curation, data, require_images(data))
    if not labelled:
        raise FinetuneError(f"none of the {len(curation.labels)} images whose cluster was set or confirmed is in "
                            f"{data}: move or confirm images in the app first (or give --data, the folder they "
                            "are in)")
    if missing:
        print(f"warning: {missing} curated image(s) are not in {data} and are left out", file=sys.stderr)
    return LearningSet(str(Path(config.run).resolve()), curation.names, labelled, excluded, missing)


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune RUN on the curated labels into ``config.out`` (or resume a stopped fine-tune there); returns
    the final metrics and what was used."""
    config = dataclasses.replace(config, out=config.out or str(Path(config.run).resolve()) + "-finetuned")
    check_options(config)
    checkpoint = load_checkpoint(config.run)
    saved, n_classes = checkpoint["config"], int(checkpoint["model_spec"]["n_classes"])
    out = Path(str(config.out))
    learning = saved_learning_set(out, Path(config.run)) if (out / CHECKPOINT_FILE).exists() else None
    if learning is not None:
        print(f"resuming the stopped fine-tune in {out} from its checkpoint, with the labels it started with",
              file=sys.stderr)
    else:
        learning = new_learning_set(config, n_classes, Path(config.data or saved["data"]))
        out.mkdir(parents=True, exist_ok=True)  # names first: a checkpoint of a run killed later exports with them
        atomic_write_text(out / CLASS_NAMES_FILE, "".join(learning.names[c] + "\n" for c in learning.keep))
        atomic_write_text(out / FINETUNE_PLAN_FILE, learning.to_json())
    keep = learning.keep
    new_cluster = learning.new_cluster()
    settings = dataclasses.replace(train_config(config, saved, len(keep)), resume=(out / CHECKPOINT_FILE).exists())

    def attach(run: Run) -> None:
        run.supervise(Supervision(labelled_draws(run, learning.labelled, new_cluster, config.labelled_per_step,
                                                 config.seed), config.supervised_weight))
        if run.resumed:  # the checkpoint holds the exclusions and the length
            return
        run.skipped.update({i: "excluded in the curation" for i in learning.excluded})
        run.count_steps_per_epoch()
        run.total_steps = 0
        run.fit_length(0)

    metrics = train(settings, start_from=None if settings.resume else head_rows(checkpoint["model"], keep),
                    prepare=attach)
    report = {"source_run": learning.source_run, "labels_from": str(config.index or config.labels),
              "classes_before": n_classes, "classes_after": len(keep),
              "clusters": [{"cluster": new_cluster[c], "from": c, "name": learning.names[c]} for c in keep],
              "labelled_images": len(learning.labelled), "excluded_images": len(learning.excluded),
              "not_found": learning.missing, "options": dataclasses.asdict(config), "final": metrics}
    atomic_write_text(out / FINETUNE_REPORT_FILE, json.dumps(report, indent=2) + "\n")
    if config.index:
        record_learning(Path(config.index), Path(config.state_dir) if config.state_dir else None, out,
                        len(learning.labelled))
    return report
