"""Everything the app does, as plain Python over a model, an index and the curation store (no Gradio here).

The UI (:mod:`app.ui`) only turns these results into components, so every behaviour is testable and the
client never names a file: images are addressed by index id and mapped to paths here.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app import exporters, projection
from app.batch import BatchItem, BatchUserError, batch_items, check_pixel_budget, decode_small
from app.generations import ServedIndex
from app.label_changes import Changes, curated_labelling, model_changes
from app.merging import MergeAdvisor
from app.results import AppUserError, Neighbour, Prediction, Progress, ReviewItem, throttled
from app.review_queue import ReviewQueue
from app.thumbnails import ThumbnailCache
from twist_core.curate.curation import EXCLUDED, CurationError, CurationStore, Cursor, Record
from twist_core.data.folder import ImageReadError, decode_image
from twist_core.deploy.infer import OnnxModel
from twist_core.index.image_index import IndexReader
from twist_core.index.metadata import IndexUserError
from twist_core.io_utils import csv_safe, mark_output_folder, path_to_text
from twist_core.label.table import label_rows, read_labels_meta

log = logging.getLogger("twist.app")
PAGE_SIZE = 60
COVER_IMAGES = 4  # most confident images on a cluster's card
MAX_BATCH_IMAGES = 2000
BATCH_CHUNK = 64  # images decoded and predicted together
MAX_BATCH_PIXELS = 500_000_000  # decoded pixels one batch request may ask for, all images together
VIEW_SIZE = 1024  # longest side of the picture in the detail view
WARMUP_STOP_SECONDS = 10.0  # close() waits this long for the thumbnail warm-up to finish its image
DISPLAY_SIDE = 400  # smaller pictures are enlarged to about this in the detail view (see Workspace.display)


class Workspace:
    """A model, its index, the curation store and the thumbnail cache, opened once per server."""

    def __init__(self, model_path: Path, index_dir: Path, state_dir: Path | None = None,
                 max_pixels: int = 50_000_000, device: str = "cpu") -> None:
        self.index_dir = Path(index_dir)
        try:
            self._served = ServedIndex(Path(model_path), self.index_dir, device)
        except (ValueError, OSError, IndexUserError) as error:
            raise AppUserError(str(error)) from None
        self.max_pixels = max_pixels
        self.state_dir = Path(state_dir) if state_dir else self.index_dir
        try:
            self._store = CurationStore.for_index(self.index_dir, self.state_dir, self.model.class_names,
                                                  self._served.meta_path)
        except CurationError as error:
            raise AppUserError(str(error)) from None
        self.thumbnails = ThumbnailCache(self.state_dir / "thumbnails", max_pixels=max_pixels,
                                         owner=self._served.index.info.get("uid"))
        self.covers_dir = self.state_dir / "thumbnails" / "covers"
        self.covers_dir.mkdir(parents=True, exist_ok=True)
        self.exports_dir = Path(tempfile.mkdtemp(prefix="twist-app-exports-"))
        for folder in (self.state_dir, self.thumbnails.folder, self.exports_dir):
            mark_output_folder(folder)
        self.merging = MergeAdvisor(self)
        self._stop = threading.Event()
        self._warmups: list[threading.Thread] = []

    # ---- following index updates (app.generations)
    def keep_up(self) -> None:
        """Follow the index's files while serving (``twist index --update``, damage and its repair).

        Called on every access to :attr:`index` and :attr:`store`, so the next request after a change sees it.
        Ids are stable across updates and the curation store is re-attached to the new generation, so every
        name, merge and move still applies; the map is cached per generation, thumbnails per id.
        """
        if self._served.keep_up(self._attach):
            for stale in self.state_dir.glob("projection-gen*.npz"):
                if stale.name != self._projection_cache().name:
                    stale.unlink(missing_ok=True)

    def _attach(self, metadata: Path, model: OnnxModel | None) -> None:
        """The curation store follows a new generation (and a new model's cluster names) before it is served."""
        self._store.reattach(metadata)
        if model is not None:
            self._store.default_names = list(model.class_names)
            if self._store.notice:
                log.warning(self._store.notice)

    @property
    def model(self) -> OnnxModel:
        return self._served.model

    @property
    def model_path(self) -> Path:
        return self._served.model_path

    @property
    def index_problem(self) -> str | None:
        """What is wrong with the index's files now (the generation open is still served), for the page."""
        return self._served.problem

    @property
    def _meta_path(self) -> Path:
        return self._served.meta_path

    @property
    def index(self) -> IndexReader:
        self.keep_up()
        return self._served.index

    @property
    def store(self) -> CurationStore:
        self.keep_up()
        return self._store

    # ---- paths the server may hand out
    @property
    def root(self) -> Path:
        return self.index.root

    @property
    def output_folders(self) -> list[str]:
        """Folders of files the app makes (thumbnails, exports): Gradio may copy these into its cache to serve.

        The dataset is not among them: pictures of it reach the browser only as images the app re-encoded.
        """
        return [str(self.thumbnails.folder.resolve()), str(self.exports_dir.resolve())]

    def misplaced_outputs(self) -> list[str]:
        """Warnings for the model, index or state folder inside the dataset folder (scans and curation suffer)."""
        root = self.root.resolve()
        places = {"index": self.index_dir, "state": self.state_dir, "model": self.model_path}
        return [f"the {what} {path} lies under the dataset folder {root}: keep it outside, so that nothing "
                "scans or serves it as part of the dataset" for what, path in places.items()
                if Path(path).resolve().is_relative_to(root)]

    def thumbnail(self, record: Record) -> Path:
        return self.thumbnails.path(record.id, self.index.file_of(record.path))

    def warm_thumbnails(self, per_cluster: int = PAGE_SIZE) -> threading.Thread:
        """Make the first page of every cluster in the background, so the first clicks are instant."""
        def work() -> None:
            for cluster in self.store.summary():
                if self._stop.is_set():
                    return
                page = self.store.page(cluster["cluster"], limit=per_cluster)
                self.thumbnails.warm(((r.id, self.index.file_of(r.path)) for r in page), self._stop.is_set)

        thread = threading.Thread(target=work, name="thumbnail-warmup", daemon=True)
        self._warmups.append(thread)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop the warm-up (it stops between two images) before the stores it reads are closed under it; remove
        the exports folder (what was handed out is in Gradio's cache), which used to outlive every run."""
        self._stop.set()
        for thread in self._warmups:
            thread.join(timeout=WARMUP_STOP_SECONDS)
        self._store.close()
        self._served.index.close()
        shutil.rmtree(self.exports_dir, ignore_errors=True)

    # ---- overview
    def largest_cluster(self) -> int | None:
        """The cluster the views open on: the largest (the lowest number among equals), never the excluded images."""
        sizes = [c for c in self.store.summary() if c["cluster"] != EXCLUDED]
        return min(sizes, key=lambda c: (-c["size"], c["cluster"]))["cluster"] if sizes else None

    def overview(self, sort: str = "size") -> list[dict[str, Any]]:
        """One card per non-empty cluster: name, size, mean confidence and a cover of its best images."""
        keys = {"size": lambda c: (-c["size"], c["cluster"]), "confidence": lambda c: (-c["mean_confidence"],
                c["cluster"]), "lowest confidence": lambda c: (c["mean_confidence"], c["cluster"]),
                "cluster": lambda c: c["cluster"]}
        if sort not in keys:
            raise AppUserError(f"sort by one of: {', '.join(keys)}")
        store = self.store
        cards = sorted(store.summary(), key=keys[sort])
        for card in cards:
            card["cover"] = self.cover(store.page(card["cluster"], limit=COVER_IMAGES))
        return cards

    def cover(self, records: Sequence[Record]) -> Path:
        """A 2 x 2 mosaic of thumbnails with white gaps between them (four images, not one), cached under a name
        derived from the image ids it shows."""
        key = hashlib.sha1(",".join(str(r.id) for r in records).encode()).hexdigest()[:16]
        path = self.covers_dir / f"{key}-gap.jpg"  # not the gapless covers of older versions
        if not path.is_file():
            size, gap = self.thumbnails.size, max(2, self.thumbnails.size // 24)
            mosaic = Image.new("RGB", (2 * size + gap, 2 * size + gap), (255, 255, 255))
            for slot, record in enumerate(records[:4]):
                with Image.open(self.thumbnail(record)) as thumb:
                    thumb = thumb.convert("RGB")
                    thumb.thumbnail((size, size))
                    left, top = (slot % 2) * (size + gap), (slot // 2) * (size + gap)
                    mosaic.paste(thumb, (left + (size - thumb.width) // 2, top + (size - thumb.height) // 2))
            tmp = path.with_name(f".{path.name}.{threading.get_ident()}")
            mosaic.save(tmp, "JPEG", quality=85)
            tmp.replace(path)
        return path

    def dataset_summary(self) -> dict[str, Any]:
        """Images, skipped files (from the labels table's meta), and the model card's main facts."""
        info = self.index.info
        skipped = None
        if info.get("source"):
            skipped = read_labels_meta(info["source"]).get("errors")
        card = self.model.card
        return {"images": self.index.size, "skipped": skipped, "root": str(self.root), "index_kind": self.index.kind,
                "clusters": self.model.n_classes, "backbone": card.get("backbone"),
                "embedding_dim": card.get("embedding_dim"), "input_size": card.get("input_size"),
                "checkpoint_epoch": card.get("checkpoint_epoch"),
                "checkpoint_sha256": str(card.get("checkpoint_sha256", ""))[:12], "model": str(self.model.path),
                "notice": self.store.notice}

    # ---- one cluster
    def cluster_page(self, cluster: int, page: int = 0, lowest_first: bool = False, min_conf: float = 0.0,
                     max_conf: float = 1.0, doubtful_first: bool = False, after: Cursor | None = None,
                     before: Cursor | None = None, thumbnails: bool = True
                     ) -> tuple[list[tuple[Record, Path | None]], int]:
        """A page of ``PAGE_SIZE`` images of a cluster (with thumbnails) and the cluster's filtered size.

        The page starts just after ``after`` (or ends just before ``before``): the cursor of the page next to it,
        which the views and the API hand back, so a page deep into a large cluster costs what the first does.
        Without a cursor, page number ``page`` is found by passing the images before it (a jump by number).
        ``doubtful_first`` orders by the review score (neighbours in another cluster, hesitation) instead of
        the confidence: a confident mistake comes first there and last by confidence. ``thumbnails=False``
        leaves them unmade (the API never shows them).
        """
        cluster = int(cluster)
        if cluster != EXCLUDED and not 0 <= cluster < self.model.n_classes:
            raise AppUserError(f"there is no cluster {cluster}")
        if min_conf > max_conf:
            raise AppUserError("the lowest confidence must not exceed the highest")
        store = self.store
        total = store.count(cluster, min_conf, max_conf)
        last = max(0, (total - 1) // PAGE_SIZE)
        wanted = max(0, int(page))
        page = min(wanted, last)
        if doubtful_first:
            records = self._doubtful_page(cluster, page, min_conf, max_conf)
        else:
            descending = not lowest_first
            if before is not None and wanted == page:
                records = store.page(cluster, PAGE_SIZE, descending, min_conf, max_conf, before=before)
            else:
                if after is None or wanted != page:
                    after = store.seek(cluster, page * PAGE_SIZE, descending, min_conf, max_conf)
                records = store.page(cluster, PAGE_SIZE, descending, min_conf, max_conf, after=after)
        return [(r, self.thumbnail(r) if thumbnails else None) for r in records], total

    def _doubtful_page(self, cluster: int, page: int, min_conf: float, max_conf: float) -> list[Record]:
        """A page of the cluster by descending review score (the store walks the scores' index)."""
        with contextlib.closing(ReviewQueue(self.store.path, self._meta_path)) as queue:
            if not queue.available:
                raise AppUserError(f"this index has no review scores (an older twist built it); add them with "
                                   f"twist index --update --out {self.index_dir}")
        return self.store.doubtful_page(cluster, page * PAGE_SIZE, PAGE_SIZE, min_conf, max_conf)

    def record(self, image_id: int) -> Record:
        found = self.store.records([int(image_id)])
        if not found:
            raise AppUserError(f"no image with id {image_id} in the index")
        return found[int(image_id)]

    def image_path(self, record: Record) -> Path:
        return self.index.file_of(record.path)

    def neighbours_of(self, image_id: int, k: int = 12) -> list[Neighbour]:
        try:
            hits = self.index.search_id(int(image_id), int(k))
        except IndexUserError as error:
            raise AppUserError(str(error)) from None
        return self._neighbours([(h.id, h.similarity or 0.0) for h in hits])

    def _neighbours(self, hits: Sequence[tuple[int, float]]) -> list[Neighbour]:
        records = self.store.records([i for i, _ in hits])
        return [Neighbour(records[i], sim, self.thumbnail(records[i])) for i, sim in hits if i in records]

    def view(self, record: Record) -> Image.Image:
        """The image for the detail view, decoded and re-encoded by the app (never its file handed out as is)."""
        image = self._decode(self.image_path(record), draft_size=VIEW_SIZE)
        image.thumbnail((VIEW_SIZE, VIEW_SIZE), Image.Resampling.BICUBIC)
        return image

    def display(self, record: Record) -> Image.Image:
        """The image as the app shows it: :meth:`view`, and a small one enlarged to about ``DISPLAY_SIDE``.

        Enlarged by a whole factor with nearest-neighbour sampling, so each pixel becomes a sharp square
        (a 32 px CIFAR image is seen, not blurred into a smudge by the browser).
        """
        image = self.view(record)
        factor = DISPLAY_SIDE // max(image.size)
        if factor > 1:
            image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
        return image

    def upload_view(self, path: str | Path) -> Image.Image:
        """An uploaded query as the app shows it: decoded and re-encoded (never the file handed back as is)."""
        image = self._decode(path, draft_size=VIEW_SIZE)
        image.thumbnail((VIEW_SIZE, VIEW_SIZE), Image.Resampling.BICUBIC)
        return image

    def describe(self, image_id: int, k: int = 12) -> tuple[Record, Prediction]:
        """An indexed image: its record, the model's full class distribution and its neighbours."""
        record = self.record(image_id)
        probs = self._predict([self._decode(self.image_path(record))])[0][0]
        return record, Prediction(probs, self.neighbours_of(image_id, k))

    # ---- search
    def _decode(self, path: str | Path, draft_size: int | None = None) -> Image.Image:
        try:
            return decode_image(path, self.max_pixels, draft_size=draft_size or self.model.transform.resize_size)
        except ImageReadError as error:
            raise AppUserError(f"this file cannot be used as an image: {error}") from None

    def _predict(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        return self.model.predict(list(images))

    def search_file(self, path: str | Path, k: int = 12) -> Prediction:
        """An uploaded image: class distribution and its ``k`` nearest indexed images with similarity."""
        probs, embeddings = self._predict([self._decode(path)])
        try:
            hits = self.index.search_vectors(embeddings, int(k))[0]
        except IndexUserError as error:  # e.g. the model gave a non-finite embedding for this image
            raise AppUserError(f"cannot search with this image: {error}") from None
        return Prediction(probs[0], self._neighbours([(h.id, h.similarity or 0.0) for h in hits]))

    def search_id(self, image_id: int, k: int = 12) -> Prediction:
        """Search from an indexed image (a click in any gallery)."""
        return self.describe(image_id, k)[1]

    # ---- curation
    def names(self) -> dict[int, str]:
        return self.store.names()

    def rename(self, cluster: int, name: str) -> str:
        self.store.rename(int(cluster), name)
        return f"cluster {int(cluster)} is now called {self.store.name(int(cluster))!r}"

    def merge(self, sources: Sequence[int], target: int) -> str:
        self.store.merge([int(s) for s in sources], int(target))
        return f"merged into {self.store.name(int(target))!r}"

    def move(self, ids: Sequence[int], target: int) -> str:
        moved = self.store.move(ids, int(target))
        where = "excluded" if int(target) == EXCLUDED else f"moved to {self.store.name(int(target))!r}"
        return f"{moved} image(s) {where}"

    def undo(self) -> str:
        return f"undone: {self.store.undo()}"

    # ---- review queue
    def review_page(self, page: int = 0, thumbnails: bool = True) -> tuple[list[ReviewItem], int]:
        """A page of the images most likely in the wrong cluster, that no person moved, excluded or kept yet.

        ``thumbnails=False`` leaves them unmade (the API never shows them: a page is then one query).
        """
        store = self.store  # follows an index update first
        with contextlib.closing(ReviewQueue(store.path, self._meta_path)) as queue:  # ~1 ms to open
            if not queue.available:
                raise AppUserError(f"this index has no review scores (an older twist built it); add them with "
                                   f"twist index --update --out {self.index_dir}")
            total = queue.count(store.derived.review_rows)
            page = max(0, min(int(page), max(0, (total - 1) // PAGE_SIZE)))
            entries = queue.page(page * PAGE_SIZE, PAGE_SIZE)
        records = store.records([e.id for e in entries])
        items = []
        for entry in entries:
            record = records.get(entry.id)
            if record is None:  # gone in an update between the two reads
                continue
            target = None if entry.suggestion is None else self.store.merged_into(entry.suggestion)
            items.append(ReviewItem(record, entry.score, None if target == record.label else target,
                                    self.thumbnail(record) if thumbnails else None))
        return items, total

    def review_scores(self, ids: Sequence[int]) -> dict[int, tuple[float, float]]:
        """(review score, share of the index scored as high or higher) of each of ``ids`` that has one: read off
        the generation's kept score quantiles (counting the scores above took a pass over most of the index)."""
        store = self.store
        with contextlib.closing(ReviewQueue(store.path, self._meta_path)) as queue:
            scores = queue.scores(list(ids))
            shares = {i: store.derived.share_at_least(e.score) for i, e in scores.items()}
            return {i: (e.score, queue.share_above(e.score) if shares[i] is None else shares[i])
                    for i, e in scores.items()}

    def keep(self, ids: Sequence[int]) -> str:
        """Confirm images in the cluster they are in: they leave the review queue (one undo entry brings them back)."""
        if not ids:
            raise AppUserError("choose an image to keep")
        return f"{self.store.confirm(ids)} image(s) kept where they are"

    # ---- what a new model changed (app.label_changes)
    def changes_since(self, previous: str | Path) -> Changes:
        """The open index as curated now against ``previous`` (a labels table or index folder beside the index,
        in the image folder or in the state folder: the app reads no other place)."""
        files, aliases = curated_labelling(self)
        return model_changes(previous, self.index_dir, [self.index_dir.parent, self.root, self.state_dir],
                             files, aliases)

    def changed_images(self, changes: Changes, limit: int) -> list[tuple[Record, str, str]]:
        """The first ``limit`` changed images that the open index holds: record, name before, name now."""
        shown = changes.changed[:limit]
        keys = [path_to_text(os.path.relpath(file, self.root)) for file, _, _ in shown]
        ids = self.index.ids_for_paths(keys)
        records = self.store.records([ids[key] for key in keys if key in ids])
        return [(records[ids[key]], before, after) for key, (_, before, after) in zip(keys, shown, strict=True)
                if key in ids]

    # ---- export
    def _export_path(self, name: str) -> Path:
        folder = Path(tempfile.mkdtemp(dir=self.exports_dir))
        return folder / name

    def export_csv(self) -> Path:
        return exporters.write_csv(self.store.iter_records(), self.names(), self._export_path("labels.csv"))

    def export_zip(self, progress: Progress | None = None) -> Path:
        """The ImageFolder tree as a zip; ``progress(done, total)`` follows the images written."""
        return exporters.write_zip(self.store.iter_records(), self.names(), self.root,
                                   self._export_path("labels-imagefolder.zip"), throttled(progress))

    def export_tree(self, folder: str, mode: str = "symlink") -> tuple[Path, dict[str, int]]:
        """Write the tree to a server folder (a new one, or one twist wrote before)."""
        tree = Path(str(folder)).expanduser()
        if not str(folder).strip() or not tree.is_absolute():
            raise AppUserError("give an absolute folder path on the server for the ImageFolder tree")
        if tree.resolve() == self.root.resolve() or self.root.resolve().is_relative_to(tree.resolve()):
            raise AppUserError("the tree cannot be written over the dataset folder")
        try:
            return tree, exporters.write_tree(self.store.iter_records(), self.names(), self.root, tree, mode)
        except (FileExistsError, ValueError, OSError) as error:
            raise AppUserError(str(error)) from None

    def export_label_studio(self, url_prefix: str = exporters.LABEL_STUDIO_PREFIX) -> tuple[Path, str]:
        version = f"twist-{str(self.model.card.get('checkpoint_sha256', ''))[:12]}"
        out = exporters.write_label_studio(self.store.iter_records(), self.names(), version,
                                           self._export_path("label-studio-tasks.json"), url_prefix, self.root,
                                           self.index.info.get("uid"))
        return out, exporters.label_studio_config(self.names()[c] for c in sorted(self.names()))

    # ---- map
    def _map_points(self) -> tuple[np.ndarray, np.ndarray, dict[int, Record], projection.MapGeometry]:
        """Sampled ids still in the index, their 2-D coordinates and records, and the drawing's geometry.

        The geometry comes from every cached point, so it stays put while images are curated or removed.
        """
        index = self.index
        ids, xy = projection.load_or_compute(self._projection_cache(index), self.store.sample(projection.MAX_POINTS),
                                             index.vector)
        geometry = projection.MapGeometry.around(xy)
        records = self.store.records(ids.tolist())
        keep = np.array([int(i) in records for i in ids], dtype=bool)
        return ids[keep], xy[keep], records, geometry

    def _projection_cache(self, index: IndexReader | None = None) -> Path:
        """The map's cache file: one per index generation, so an update draws a fresh map."""
        return self.state_dir / f"projection-gen{(index or self._served.index).generation}.npz"

    def _cluster_names(self, ids: np.ndarray, records: dict[int, Record]) -> list[str]:
        names = self.names()
        return [names.get(records[int(i)].label, "excluded") for i in ids]

    def projection(self) -> list[dict[str, Any]]:
        """The 2-D map as data: one point per sampled image with its current label."""
        ids, xy, records, _ = self._map_points()
        return [{"x": float(x), "y": float(y), "id": int(i), "cluster": name}
                for i, (x, y), name in zip(ids, xy, self._cluster_names(ids, records), strict=True)]

    def map_picture(self) -> np.ndarray:
        """The map drawn as an RGB picture, coloured by current cluster; a click on it goes to :meth:`map_point`."""
        ids, xy, records, geometry = self._map_points()
        clusters = [records[int(i)].label for i in ids]
        return projection.draw_map(xy, clusters, {**self.names(), EXCLUDED: "excluded"}, geometry)

    def map_point(self, x: float, y: float) -> int:
        """Id of the image drawn nearest to pixel (x, y) of :meth:`map_picture`."""
        ids, xy, _, geometry = self._map_points()
        row = geometry.nearest(xy, (float(x), float(y)))
        if row is None:
            raise AppUserError("no image there: click on a point of the map")
        return int(ids[row])

    # ---- batch
    def batch_label(self, files: Sequence[str | Path], progress: Progress | None = None
                    ) -> tuple[Path, list[list[Any]]]:
        """Predict every uploaded image (and every image in an uploaded zip) and write a CSV of labels.

        Images are sized from their headers first (a request past ``MAX_BATCH_PIXELS`` is refused whole),
        then decoded one by one at the model's scale and predicted in chunks: memory stays that of one image.
        ``progress(done, total)`` is called after each chunk.
        """
        with contextlib.ExitStack() as zips:
            try:
                items = batch_items(files, zips, MAX_BATCH_IMAGES)
                if not items:
                    raise AppUserError("upload at least one image or a zip of images")
                check_pixel_budget(items, MAX_BATCH_PIXELS, self.max_pixels)
            except BatchUserError as error:
                raise AppUserError(str(error)) from None
            names = self.names()
            rows: list[list[Any]] = []
            for start in range(0, len(items), BATCH_CHUNK):
                rows += self._label_chunk(items[start:start + BATCH_CHUNK], names)
                if progress is not None:
                    progress(len(rows), len(items))
        out = self._export_path("batch-labels.csv")
        with open(out, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "cluster", "cluster_name", "confidence", "error"])
            writer.writerows([csv_safe(cell) for cell in row] for row in rows)
        return out, rows

    def _label_chunk(self, items: Sequence[BatchItem], names: dict[int, str]) -> list[list[Any]]:
        decoded = [(item.name, *self._batch_decode(item)) for item in items]
        images = [image for _, image, _ in decoded if image is not None]
        good = [name for name, image, _ in decoded if image is not None]
        labelled = iter(label_rows(good, self._predict(images)[0], self.model.class_names) if images else [])
        rows: list[list[Any]] = []
        for name, image, error in decoded:
            if image is None:
                rows.append([name, "", "", "", error])
                continue
            row = next(labelled)
            cluster = self.store.merged_into(row["cluster"])  # shown as curated: merged and renamed
            rows.append([name, cluster, names.get(cluster, ""), row["confidence"], ""])
        return rows

    def _batch_decode(self, item: BatchItem) -> tuple[Image.Image | None, str]:
        if item.source is None:
            return None, item.error
        try:
            return decode_small(item.source(), self.max_pixels, self.model.transform.resize_size), ""
        except ImageReadError as error:
            return None, str(error)
