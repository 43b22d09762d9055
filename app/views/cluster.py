"""The Cluster view: one cluster's images paged and filtered, one image inspected, and the curation tools.

It opens on the largest cluster (set on each page load, which opens its first page).

Shares ``cluster`` (the cluster dropdown), ``cluster_choices`` (the three cluster dropdowns) and ``show_cluster``
(event kwargs that reload the open page, for ``.then(**ctx["show_cluster"])`` after a change elsewhere).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from app.views import ViewContext
from app.views.shared import (
    cluster_choices,
    cluster_number,
    current_choices,
    friendly,
    image_panel,
    image_selector,
    literal,
    parse_ids,
)
from app.workspace import PAGE_SIZE, Workspace
from twist_core.curate.curation import EXCLUDED


def build(ctx: ViewContext) -> None:
    ClusterView(ctx)


class ClusterView:
    """Layout first (:meth:`_browse`, :meth:`_curate`), then the events (:meth:`_wire_browse`, :meth:`_wire_curate`)."""

    def __init__(self, ctx: ViewContext) -> None:
        self.ws: Workspace = ctx.ws
        with gr.Tab("Cluster", id="cluster"):
            self._browse()
            with gr.Accordion("Curate", open=True):
                self._curate()
        self.choices = [self.cluster, self.merge_sources, self.move_target]
        self.page_inputs = [self.cluster, self.page, self.lowest_first, self.min_conf, self.max_conf]
        self.page_outputs = [self.gallery, self.page_info, self.page_ids, self.page]
        self.refresh = {"fn": self.first_page, "inputs": self.page_inputs, "outputs": self.page_outputs,
                        "api_visibility": "private"}
        ctx.share(cluster=self.cluster, cluster_choices=self.choices, show_cluster=self.refresh)
        ctx.demo.load(self.opening_choices, None, self.choices, api_visibility="private")
        self._wire_browse()
        self._wire_curate()
        ctx.after_build(lambda: ctx["send_to_search"](self.inspected.neighbours, self.inspected.neighbour_ids))

    # ---- layout
    def _browse(self) -> None:
        with gr.Row():
            self.cluster = gr.Dropdown(cluster_choices(self.ws, True), value=None, label="Cluster",
                                       elem_id="cluster-choice", allow_custom_value=True)
            self.lowest_first = gr.Checkbox(False, label="Lowest confidence first (finds the mistakes)")
            self.min_conf = gr.Slider(0, 1, 0, step=0.01, label="Minimum confidence")
            self.max_conf = gr.Slider(0, 1, 1, step=0.01, label="Maximum confidence")
        with gr.Row():
            self.previous_page = gr.Button("◀ previous page", size="sm")
            self.page = gr.Number(0, precision=0, label="Page (from 0)", minimum=0)
            self.next_page = gr.Button("next page ▶", size="sm")
        self.page_info = gr.Markdown(elem_id="page-info")
        self.gallery = gr.Gallery(label="Images (click to inspect and to add to the selection)", columns=10,
                                  allow_preview=False, height="auto", elem_id="cluster-gallery")
        self.page_ids = gr.State([])
        self.inspected = image_panel("inspect", "Nearest neighbours (click to search from one)")

    def _curate(self) -> None:
        with gr.Row():
            self.new_name = gr.Textbox(label="New name for this cluster", elem_id="new-name")
            self.rename = gr.Button("Rename", elem_id="rename")
        with gr.Row():
            self.merge_sources = gr.Dropdown(cluster_choices(self.ws, False), multiselect=True,
                                             elem_id="merge-sources", allow_custom_value=True,
                                             label="Merge these clusters into this one")
            self.merge = gr.Button("Merge")
        with gr.Row():
            self.selection = gr.Textbox(label="Selected image ids (clicks in the gallery toggle; editable)",
                                        elem_id="selection")
            self.select_page = gr.Button("Select the whole page", elem_id="select-page")
            self.clear = gr.Button("Clear selection")
        self.selection_gallery = gr.Gallery(label="Selection (click an image to drop it)", columns=15,
                                            allow_preview=False, height="auto", elem_id="selection-gallery")
        self.selection_ids = gr.State([])
        with gr.Row():
            self.selection_count = gr.Markdown("0 selected", elem_id="selection-count")
            self.move_target = gr.Dropdown(cluster_choices(self.ws, False), label="Move the selection to",
                                           elem_id="move-target", allow_custom_value=True)
            self.move = gr.Button("Move")
            self.exclude = gr.Button("Exclude")
            self.confirm = gr.Button("Confirm as correct (the selection, else the page)", elem_id="confirm")
        with gr.Row():
            self.undo_button = gr.Button("Undo last change", elem_id="undo")
        self.status = gr.Markdown(elem_id="status")
        self.history = gr.Markdown()

    # ---- handlers
    @friendly
    def open_cluster(self, cluster: int, page: int, lowest_first: bool, min_conf: float,
                     max_conf: float) -> tuple[list, str, list[int], int]:
        cluster = cluster_number(cluster, "choose a cluster first")
        items, total = self.ws.cluster_page(cluster, int(page or 0), bool(lowest_first), float(min_conf),
                                            float(max_conf))
        pages = max(1, -(-total // PAGE_SIZE))
        page = min(max(0, int(page or 0)), pages - 1)
        info = (f"**{literal(self.ws.store.name(cluster))}**: {total:,} images in the confidence range · page "
                f"{page + 1} of {pages} · {'lowest' if lowest_first else 'highest'} confidence first")
        gallery = [(str(thumb), f"#{r.id} · {r.confidence or 0:.2f}") for r, thumb in items]
        return gallery, info, [r.id for r, _ in items], page

    @friendly
    def opening_choices(self) -> tuple[Any, Any, Any]:
        """On each page load: the dropdowns as the store is now, the cluster on the largest one (its page opens)."""
        sizes = [c for c in self.ws.store.summary() if c["cluster"] != EXCLUDED]
        largest = min(sizes, key=lambda c: (-c["size"], c["cluster"]))["cluster"] if sizes else None
        _, merge, move = current_choices(self.ws)
        return gr.Dropdown(choices=cluster_choices(self.ws, True), value=largest), merge, move

    def first_page(self, *values: Any) -> tuple:
        return self.open_cluster(values[0], 0, *values[2:])

    def curation_result(self, message: str) -> tuple[str, str, Any, Any, Any]:
        history = "\n".join(f"- {literal(line)}" for line in self.ws.store.history()) or "no changes yet"
        return (literal(message), history, *current_choices(self.ws))

    @friendly
    def rename_cluster(self, cluster: int, name: str) -> tuple:
        return self.curation_result(self.ws.rename(cluster_number(cluster, "choose a cluster first"), name))

    @friendly
    def merge_clusters(self, sources: list[int], target: int) -> tuple:
        target = cluster_number(target, "choose the cluster to merge into")
        return self.curation_result(self.ws.merge([cluster_number(s, "") for s in sources or []], target))

    @friendly
    def move_images(self, ids: str, target: int) -> tuple:
        target = cluster_number(target, "choose the cluster to move the images to")
        return self.curation_result(self.ws.move(parse_ids(ids), target))

    @friendly
    def exclude_images(self, ids: str) -> tuple:
        return self.curation_result(self.ws.move(parse_ids(ids), EXCLUDED))

    @friendly
    def confirm_images(self, ids: str, page_ids: list[int]) -> tuple:
        """Confirm the selected images' clusters, or the whole page's when nothing is selected (twist finetune)."""
        confirmed = self.ws.store.confirm(parse_ids(ids) or list(page_ids or []))
        return self.curation_result(f"{confirmed} image(s) confirmed in their cluster")

    @friendly
    def undo(self) -> tuple:
        return self.curation_result(self.ws.undo())

    @friendly
    def show_selection(self, text: str) -> tuple[list, list[int], str]:
        """The selected images as thumbnails (click one to drop it); ids no longer in the index are dropped."""
        wanted = parse_ids(text)
        records, names = self.ws.store.records(wanted), self.ws.names()
        kept = [i for i in dict.fromkeys(wanted) if i in records]
        items = [(str(self.ws.thumbnail(records[i])), f"#{i} · {names.get(records[i].label, 'excluded')}")
                 for i in kept]
        return items, kept, f"{len(kept)} selected"

    # ---- events
    def _wire_browse(self) -> None:
        inputs, outputs = self.page_inputs, self.page_outputs
        for trigger in (self.cluster.change, self.lowest_first.change, self.min_conf.release, self.max_conf.release):
            trigger(self.first_page, inputs, outputs, api_visibility="private")
        self.page.submit(self.open_cluster, inputs, outputs, api_name="open_cluster")
        self.previous_page.click(lambda *v: self.open_cluster(v[0], max(0, int(v[1] or 0) - 1), *v[2:]), inputs,
                                 outputs, api_visibility="private")
        self.next_page.click(lambda *v: self.open_cluster(v[0], int(v[1] or 0) + 1, *v[2:]), inputs, outputs,
                             api_visibility="private")

        select_image = image_selector(self.ws)
        inspected = self.inspected

        def image_clicked(ids: list[int], chosen: str, evt: gr.SelectData) -> tuple[int, str]:
            picked = ids[evt.index]
            current = parse_ids(chosen)
            current = [i for i in current if i != picked] if picked in current else [*current, picked]
            return picked, ", ".join(map(str, current))

        inspected.image_id.submit(select_image, [inspected.image_id], inspected.outputs, api_name="select_image")
        self.gallery.select(image_clicked, [self.page_ids, self.selection], [inspected.image_id, self.selection],
                            api_visibility="private").then(select_image, [inspected.image_id], inspected.outputs,
                                                           api_visibility="private")

    def _wire_curate(self) -> None:
        outputs = [self.status, self.history, *self.choices]
        refresh = self.refresh
        self.rename.click(self.rename_cluster, [self.cluster, self.new_name], outputs,
                          api_name="rename_cluster").then(**refresh)
        self.merge.click(self.merge_clusters, [self.merge_sources, self.cluster], outputs,
                         api_name="merge_clusters").then(**refresh)
        self.move.click(self.move_images, [self.selection, self.move_target], outputs,
                        api_name="move_images").then(**refresh)
        self.exclude.click(self.exclude_images, [self.selection], outputs, api_name="exclude_images").then(**refresh)
        self.confirm.click(self.confirm_images, [self.selection, self.page_ids], outputs,
                           api_name="confirm_images").then(**refresh)
        self.clear.click(lambda: "", None, [self.selection], api_visibility="private")
        self.select_page.click(lambda ids, chosen: ", ".join(map(str, dict.fromkeys([*parse_ids(chosen), *ids]))),
                               [self.page_ids, self.selection], [self.selection], api_visibility="private")
        self.selection.change(self.show_selection, [self.selection],
                              [self.selection_gallery, self.selection_ids, self.selection_count],
                              api_name="show_selection")

        def selection_clicked(ids: list[int], evt: gr.SelectData) -> str:
            return ", ".join(str(i) for position, i in enumerate(ids) if position != evt.index)

        self.selection_gallery.select(selection_clicked, [self.selection_ids], [self.selection],
                                      api_visibility="private")
        self.undo_button.click(self.undo, None, outputs, api_name="undo").then(**refresh)
