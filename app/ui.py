"""The Gradio layout and its event wiring; each user action is also a named API endpoint (``api_name``).

Handlers only adapt :class:`app.workspace.Workspace` results to components. Every handler goes through
:func:`friendly`, so a user mistake (or an unexpected failure) reaches the browser as a sentence, never a trace.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import Any

import gradio as gr
import pandas as pd

from app.curation import EXCLUDED, CurationError
from app.views import merges as merges_view
from app.workspace import PAGE_SIZE, AppUserError, Neighbour, Prediction, Workspace
from twist_core.index_store import IndexUserError

log = logging.getLogger("twist.app")
SORTS = ["size", "confidence", "lowest confidence", "cluster"]
TOP_CLASSES = 10  # bars in a class-distribution chart


def friendly(fn: Callable) -> Callable:
    """Turn known problems into their message and anything else into one line (the trace goes to the log)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (AppUserError, CurationError, IndexUserError) as error:
            raise gr.Error(str(error), print_exception=False) from None
        except Exception as error:
            log.exception("request failed")
            raise gr.Error(f"the request failed ({type(error).__name__}); the server log has details",
                           print_exception=False) from None
    return wrapper


def parse_ids(text: str | None) -> list[int]:
    """Image ids from text such as ``"12, 40 #7"``."""
    return [int(t) for t in re.findall(r"\d+", text or "")]


def cluster_number(value: Any, missing: str) -> int:
    """A cluster from a dropdown or an API call; the dropdowns accept any value, so it is checked here."""
    if value is None or value == "":
        raise AppUserError(missing)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise AppUserError(f"{value!r} is not a cluster: choose one from the list") from None


def distribution(ws: Workspace, probs: Any) -> pd.DataFrame:
    names = ws.names()
    top = probs.argsort()[::-1][:TOP_CLASSES]
    return pd.DataFrame({"cluster": [f"{int(c)} {names.get(int(c), '')}" for c in top],
                         "probability": [round(float(probs[c]), 4) for c in top]})


def neighbour_items(ws: Workspace, neighbours: list[Neighbour]) -> list[tuple[str, str]]:
    names = ws.names()
    return [(str(n.thumbnail), f"#{n.record.id} · {names.get(n.record.label, 'excluded')} · sim {n.similarity:.3f}")
            for n in neighbours]


def image_panel(id_elem: str, details_elem: str) -> tuple[gr.Number, gr.Image, gr.Markdown, gr.BarPlot]:
    """Image id, picture, details and class-distribution chart of one image (the outputs of ``select_image``)."""
    with gr.Row():
        with gr.Column(scale=1):
            image_id = gr.Number(None, precision=0, label="Image id", elem_id=id_elem)
            picture = gr.Image(type="pil", format="png", interactive=False, label="Image", height=220)
        with gr.Column(scale=2):
            details = gr.Markdown(elem_id=details_elem)
            plot = gr.BarPlot(x="cluster", y="probability", label="Class distribution", sort="-y")
    return image_id, picture, details, plot


def build_ui(ws: Workspace) -> gr.Blocks:
    """The whole app; ``ws`` is shared by every session (state lives in the curation store, not the browser)."""

    def cluster_choices(include_excluded: bool) -> list[tuple[str, int]]:
        sizes = {c["cluster"]: c["size"] for c in ws.store.summary()}
        names = ws.names()
        merged = {c: ws.store.merged_into(c) for c in names}
        choices = [(f"{c} · {names[c]} ({sizes.get(c, 0)})", c) for c in sorted(names) if merged[c] == c]
        return [*choices, (f"excluded ({sizes.get(EXCLUDED, 0)})", EXCLUDED)] if include_excluded else choices

    def prediction_outputs(prediction: Prediction) -> tuple[pd.DataFrame, list, list[int]]:
        return (distribution(ws, prediction.probs), neighbour_items(ws, prediction.neighbours),
                [n.record.id for n in prediction.neighbours])

    # ---- handlers (named API endpoints)
    @friendly
    def overview(sort: str) -> tuple[list, pd.DataFrame, str, list[int]]:
        cards = ws.overview(sort)
        items = [(str(c["cover"]), f"{c['cluster']} · {c['name']} · {c['size']:,} images · "
                                   f"conf {c['mean_confidence'] or 0:.2f}") for c in cards]
        table = pd.DataFrame([{"cluster": c["cluster"], "name": c["name"], "size": c["size"],
                               "mean confidence": round(c["mean_confidence"] or 0, 4)} for c in cards])
        s = ws.dataset_summary()
        summary = (f"**{s['images']:,} images** in {len(cards)} non-empty clusters (model: {s['clusters']}) · "
                   f"skipped files: {'unknown' if s['skipped'] is None else s['skipped']} · folder `{s['root']}`  \n"
                   f"model `{s['model']}`: {s['backbone']}, {s['embedding_dim']}-d embeddings, "
                   f"{s['input_size']} px input, epoch {s['checkpoint_epoch']}, checkpoint {s['checkpoint_sha256']} · "
                   f"{s['index_kind']} index")
        return items, table, summary, [c["cluster"] for c in cards]

    @friendly
    def open_cluster(cluster: int, page: int, lowest_first: bool, min_conf: float,
                     max_conf: float) -> tuple[list, str, list[int], int]:
        cluster = cluster_number(cluster, "choose a cluster first")
        items, total = ws.cluster_page(cluster, int(page or 0), bool(lowest_first), float(min_conf),
                                       float(max_conf))
        pages = max(1, -(-total // PAGE_SIZE))
        page = min(max(0, int(page or 0)), pages - 1)
        info = (f"**{ws.store.name(cluster)}**: {total:,} images in the confidence range · page {page + 1} "
                f"of {pages} · {'lowest' if lowest_first else 'highest'} confidence first")
        gallery = [(str(thumb), f"#{r.id} · {r.confidence or 0:.2f}") for r, thumb in items]
        return gallery, info, [r.id for r, _ in items], page

    @friendly
    def select_image(image_id: int) -> tuple[Any, str, pd.DataFrame, list, list[int]]:
        record, prediction = ws.describe(int(image_id))
        details = (f"**#{record.id}** `{record.path}`  \nlabel: {ws.store.name(record.label)} ({record.status}) · "
                   f"predicted: {ws.store.name(record.predicted)} · confidence {record.confidence or 0:.3f}")
        return (ws.view(record), details, *prediction_outputs(prediction))

    @friendly
    def search_upload(path: str | None, k: int) -> tuple[pd.DataFrame, list, list[int]]:
        if not path:
            raise AppUserError("upload an image to search with")
        return prediction_outputs(ws.search_file(path, int(k)))

    @friendly
    def search_id(image_id: int, k: int) -> tuple[pd.DataFrame, list, list[int]]:
        return prediction_outputs(ws.search_id(int(image_id), int(k)))

    def current_choices() -> tuple[Any, Any, Any]:
        """The Cluster, Merge and Move dropdowns as the store is now (on each page load and after each change)."""
        return (gr.Dropdown(choices=cluster_choices(True)), gr.Dropdown(choices=cluster_choices(False)),
                gr.Dropdown(choices=cluster_choices(False)))

    def curation_result(message: str) -> tuple[str, str, Any, Any, Any]:
        history = "\n".join(f"- {line}" for line in ws.store.history()) or "no changes yet"
        return (message, history, *current_choices())

    @friendly
    def rename_cluster(cluster: int, name: str) -> tuple:
        return curation_result(ws.rename(cluster_number(cluster, "choose a cluster first"), name))

    @friendly
    def merge_clusters(sources: list[int], target: int) -> tuple:
        target = cluster_number(target, "choose the cluster to merge into")
        return curation_result(ws.merge([cluster_number(s, "") for s in sources or []], target))

    @friendly
    def move_images(ids: str, target: int) -> tuple:
        target = cluster_number(target, "choose the cluster to move the images to")
        return curation_result(ws.move(parse_ids(ids), target))

    @friendly
    def exclude_images(ids: str) -> tuple:
        return curation_result(ws.move(parse_ids(ids), EXCLUDED))

    @friendly
    def undo() -> tuple:
        return curation_result(ws.undo())

    @friendly
    def export_csv() -> str:
        return str(ws.export_csv())

    @friendly
    def export_zip() -> str:
        return str(ws.export_zip())

    @friendly
    def export_tree(folder: str, mode: str) -> str:
        tree, counts = ws.export_tree(folder, mode)
        return f"wrote {sum(counts.values()):,} images in {len(counts)} folders to `{tree}`"

    @friendly
    def export_label_studio(url_prefix: str) -> tuple[str, str]:
        out, config = ws.export_label_studio(url_prefix)
        return str(out), config

    @friendly
    def projection() -> list[dict]:
        """Every point of the map: x, y, image id and current cluster name."""
        return ws.projection()

    @friendly
    def map_picture() -> Any:
        return ws.map_picture()

    @friendly
    def map_point(x: float, y: float) -> int:
        """The image drawn nearest to a clicked pixel of the map picture."""
        return ws.map_point(float(x), float(y))

    @friendly
    def show_selection(text: str) -> tuple[list, list[int], str]:
        """The selected images as thumbnails (click one to drop it); ids no longer in the index are dropped."""
        wanted = parse_ids(text)
        records, names = ws.store.records(wanted), ws.names()
        kept = [i for i in dict.fromkeys(wanted) if i in records]
        items = [(str(ws.thumbnail(records[i])), f"#{i} · {names.get(records[i].label, 'excluded')}") for i in kept]
        return items, kept, f"{len(kept)} selected"

    @friendly
    def batch_label(files: list[str] | None) -> tuple[str, pd.DataFrame]:
        out, rows = ws.batch_label(list(files or []))
        return str(out), pd.DataFrame(rows[:200], columns=["file", "cluster", "cluster_name", "confidence", "error"])

    # ---- layout
    with gr.Blocks(title="TWIST clusters") as demo:
        gr.Markdown("## TWIST: discovered clusters")
        with gr.Tabs() as tabs:
            with gr.Tab("Clusters", id="clusters"):
                summary = gr.Markdown(elem_id="summary")
                sort = gr.Radio(SORTS, value="size", label="Sort clusters by")
                cards = gr.Gallery(label="Clusters (click one to open it)", columns=5, allow_preview=False,
                                   object_fit="contain", height="auto", elem_id="cluster-cards")
                table = gr.Dataframe(interactive=False, label="Clusters")
                card_ids = gr.State([])
            with gr.Tab("Cluster", id="cluster"):
                with gr.Row():
                    cluster = gr.Dropdown(cluster_choices(True), value=None, label="Cluster", elem_id="cluster-choice",
                                          allow_custom_value=True)
                    lowest_first = gr.Checkbox(False, label="Lowest confidence first (finds the mistakes)")
                    min_conf = gr.Slider(0, 1, 0, step=0.01, label="Minimum confidence")
                    max_conf = gr.Slider(0, 1, 1, step=0.01, label="Maximum confidence")
                with gr.Row():
                    previous_page = gr.Button("◀ previous page", size="sm")
                    page = gr.Number(0, precision=0, label="Page (from 0)", minimum=0)
                    next_page = gr.Button("next page ▶", size="sm")
                page_info = gr.Markdown(elem_id="page-info")
                gallery = gr.Gallery(label="Images (click to inspect and to add to the selection)", columns=10,
                                     allow_preview=False, height="auto", elem_id="cluster-gallery")
                page_ids = gr.State([])
                current_id, detail_image, details, detail_plot = image_panel("current-id", "details")
                neighbours = gr.Gallery(label="Nearest neighbours (click to search from one)", columns=12,
                                        allow_preview=False, height="auto")
                neighbour_ids = gr.State([])
                with gr.Accordion("Curate", open=True):
                    with gr.Row():
                        new_name = gr.Textbox(label="New name for this cluster", elem_id="new-name")
                        rename = gr.Button("Rename", elem_id="rename")
                    with gr.Row():
                        merge_sources = gr.Dropdown(cluster_choices(False), multiselect=True, elem_id="merge-sources",
                                                    allow_custom_value=True, label="Merge these clusters into this one")
                        merge = gr.Button("Merge")
                    with gr.Row():
                        selection = gr.Textbox(label="Selected image ids (clicks in the gallery toggle; editable)",
                                               elem_id="selection")
                        select_page = gr.Button("Select the whole page", elem_id="select-page")
                        clear = gr.Button("Clear selection")
                    selection_gallery = gr.Gallery(label="Selection (click an image to drop it)", columns=15,
                                                   allow_preview=False, height="auto", elem_id="selection-gallery")
                    selection_ids = gr.State([])
                    with gr.Row():
                        selection_count = gr.Markdown("0 selected", elem_id="selection-count")
                        move_target = gr.Dropdown(cluster_choices(False), label="Move the selection to",
                                                  elem_id="move-target", allow_custom_value=True)
                        move = gr.Button("Move")
                        exclude = gr.Button("Exclude")
                    with gr.Row():
                        undo_button = gr.Button("Undo last change", elem_id="undo")
                    status = gr.Markdown(elem_id="status")
                    history = gr.Markdown()
            with gr.Tab("Search", id="search"):
                with gr.Row():
                    upload = gr.File(label="Upload an image", type="filepath", elem_id="search-upload")
                    paste = gr.Image(label="…or paste / drop one", type="filepath", sources=["upload", "clipboard"])
                    k = gr.Slider(1, 60, 12, step=1, label="Neighbours")
                search_plot = gr.BarPlot(x="cluster", y="probability", label="Class distribution", sort="-y")
                search_gallery = gr.Gallery(label="Nearest neighbours (click to search from one)", columns=12,
                                            allow_preview=False, height="auto", elem_id="search-results")
                search_ids = gr.State([])
                search_from = gr.Number(None, precision=0, label="Search from image id", elem_id="search-from")
            with gr.Tab("Export", id="export"):
                with gr.Row():
                    csv_button = gr.Button("Labels as CSV", elem_id="export-csv")
                    zip_button = gr.Button("ImageFolder tree as zip")
                    ls_prefix = gr.Textbox("/data/local-files/?d=", label="Label Studio image URL prefix")
                    ls_button = gr.Button("Label Studio tasks (JSON)")
                export_file = gr.File(label="Download", elem_id="export-file")
                ls_config = gr.Code(label="Label Studio labelling config", language="html")
                with gr.Row():
                    tree_folder = gr.Textbox(label="ImageFolder tree on the server (absolute folder)")
                    tree_mode = gr.Radio(["symlink", "copy"], value="symlink", label="Tree holds")
                    tree_button = gr.Button("Write tree")
                tree_status = gr.Markdown()
            with gr.Tab("Map", id="map"):
                map_button = gr.Button("Draw the map (PCA of the embeddings, coloured by cluster)",
                                       elem_id="draw-map")
                map_image = gr.Image(type="numpy", interactive=False, label="Click a point to see its image",
                                     elem_id="map-image", buttons=["download"])
                map_id, map_detail_image, map_details, map_plot = image_panel("map-id", "map-details")
                map_gallery = gr.Gallery(label="Its nearest neighbours (click to search from one)", columns=12,
                                         allow_preview=False, height="auto")
                map_ids = gr.State([])
            with gr.Tab("Batch", id="batch"):
                batch_files = gr.File(label="Images or a zip of images", file_count="multiple", type="filepath")
                batch_button = gr.Button("Label them")
                batch_csv = gr.File(label="Predicted labels (CSV)")
                batch_table = gr.Dataframe(interactive=False)
            with gr.Tab("Suggested merges", id="merges"):
                merges_view.build(ws, friendly)

        # ---- wiring
        overview_io = {"inputs": [sort], "outputs": [cards, table, summary, card_ids]}
        demo.load(overview, **overview_io, api_name="overview")
        demo.load(friendly(current_choices), None, [cluster, merge_sources, move_target], api_visibility="private")
        sort.change(overview, **overview_io, api_visibility="private")

        page_inputs = [cluster, page, lowest_first, min_conf, max_conf]
        page_outputs = [gallery, page_info, page_ids, page]

        def first_page(*values: Any) -> tuple:
            return open_cluster(values[0], 0, *values[2:])

        def card_clicked(ids: list[int], evt: gr.SelectData) -> tuple[int, Any]:
            return ids[evt.index], gr.Tabs(selected="cluster")

        cards.select(card_clicked, [card_ids], [cluster, tabs], api_visibility="private")
        for trigger in (cluster.change, lowest_first.change, min_conf.release, max_conf.release):
            trigger(first_page, page_inputs, page_outputs, api_visibility="private")
        page.submit(open_cluster, page_inputs, page_outputs, api_name="open_cluster")
        previous_page.click(lambda *v: open_cluster(v[0], max(0, int(v[1] or 0) - 1), *v[2:]), page_inputs,
                            page_outputs, api_visibility="private")
        next_page.click(lambda *v: open_cluster(v[0], int(v[1] or 0) + 1, *v[2:]), page_inputs, page_outputs,
                        api_visibility="private")

        detail_outputs = [detail_image, details, detail_plot, neighbours, neighbour_ids]

        def image_clicked(ids: list[int], chosen: str, evt: gr.SelectData) -> tuple[int, str]:
            picked = ids[evt.index]
            current = parse_ids(chosen)
            current = [i for i in current if i != picked] if picked in current else [*current, picked]
            return picked, ", ".join(map(str, current))

        current_id.submit(select_image, [current_id], detail_outputs, api_name="select_image")
        gallery.select(image_clicked, [page_ids, selection], [current_id, selection],
                       api_visibility="private").then(select_image, [current_id], detail_outputs,
                                                      api_visibility="private")

        search_outputs = [search_plot, search_gallery, search_ids]
        upload.upload(search_upload, [upload, k], search_outputs, api_name="search_upload")
        paste.upload(search_upload, [paste, k], search_outputs, api_visibility="private")
        paste.input(search_upload, [paste, k], search_outputs, api_name="search_paste")
        search_from.submit(search_id, [search_from, k], search_outputs, api_name="search_id")

        def search_clicked(ids: list[int], evt: gr.SelectData) -> tuple[int, Any]:
            return ids[evt.index], gr.Tabs(selected="search")

        for source, ids in ((search_gallery, search_ids), (neighbours, neighbour_ids), (map_gallery, map_ids)):
            source.select(search_clicked, [ids], [search_from, tabs], api_visibility="private").then(
                search_id, [search_from, k], search_outputs, api_visibility="private")

        curation_outputs = [status, history, cluster, merge_sources, move_target]
        refresh = {"fn": first_page, "inputs": page_inputs, "outputs": page_outputs, "api_visibility": "private"}
        rename.click(rename_cluster, [cluster, new_name], curation_outputs, api_name="rename_cluster").then(**refresh)
        merge.click(merge_clusters, [merge_sources, cluster], curation_outputs, api_name="merge_clusters").then(
            **refresh)
        move.click(move_images, [selection, move_target], curation_outputs, api_name="move_images").then(**refresh)
        exclude.click(exclude_images, [selection], curation_outputs, api_name="exclude_images").then(**refresh)
        clear.click(lambda: "", None, [selection], api_visibility="private")
        select_page.click(lambda ids, chosen: ", ".join(map(str, dict.fromkeys([*parse_ids(chosen), *ids]))),
                          [page_ids, selection], [selection], api_visibility="private")
        selection.change(show_selection, [selection], [selection_gallery, selection_ids, selection_count],
                         api_name="show_selection")

        def selection_clicked(ids: list[int], evt: gr.SelectData) -> str:
            return ", ".join(str(i) for position, i in enumerate(ids) if position != evt.index)

        selection_gallery.select(selection_clicked, [selection_ids], [selection], api_visibility="private")
        undo_button.click(undo, None, curation_outputs, api_name="undo").then(**refresh)

        csv_button.click(export_csv, None, [export_file], api_name="export_csv", concurrency_id="export",
                         concurrency_limit=1)
        zip_button.click(export_zip, None, [export_file], api_name="export_zip", concurrency_id="export",
                         concurrency_limit=1)
        ls_button.click(export_label_studio, [ls_prefix], [export_file, ls_config], api_name="export_label_studio",
                        concurrency_id="export", concurrency_limit=1)
        tree_button.click(export_tree, [tree_folder, tree_mode], [tree_status], api_name="export_tree",
                          concurrency_id="export", concurrency_limit=1)

        map_button.click(map_picture, None, [map_image], api_name="map_picture")
        gr.api(projection, api_name="projection")  # the map as data, for scripts
        map_x, map_y = gr.Number(visible=False), gr.Number(visible=False)

        def map_clicked(evt: gr.SelectData) -> tuple[float, float]:
            x, y = evt.index
            return float(x), float(y)

        map_outputs = [map_detail_image, map_details, map_plot, map_gallery, map_ids]
        map_image.select(map_clicked, None, [map_x, map_y], api_visibility="private").then(
            map_point, [map_x, map_y], [map_id], api_name="map_point").success(
            select_image, [map_id], map_outputs, api_visibility="private")
        map_id.submit(select_image, [map_id], map_outputs, api_visibility="private")
        batch_button.click(batch_label, [batch_files], [batch_csv, batch_table], api_name="batch_label")
    return demo
