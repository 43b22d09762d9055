"""The Cluster view: one cluster's images paged and filtered, one image inspected, and the curation tools.

It opens on the largest cluster (set on each page load, which opens its first page) with its first image
inspected. A click on an image inspects it; selecting is a separate, explicit act ("Select the inspected image",
"Select the whole page"), so looking around never builds a selection that the next Move would apply.

Shares ``cluster`` (the cluster dropdown), ``cluster_choices`` (the three cluster dropdowns), ``refresh_choices``
(event kwargs that bring those dropdowns up to date after a change, keeping the values that still exist) and
``show_cluster`` (event kwargs that reload the open page, for ``.then(**ctx["show_cluster"])``) and
``after_change`` (the steps that bring this whole view up to date after a curation change made elsewhere: its
dropdowns, page, inspected image and selection, each a ``.then(**step)``).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from app.views import ViewContext
from app.views.shared import (
    FIT,
    QUIET,
    cluster_choices,
    cluster_number,
    fresh_choices,
    friendly,
    image_panel,
    image_selector,
    literal,
    parse_ids,
)
from app.workspace import PAGE_SIZE, AppUserError, Workspace
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
        self.page_inputs = [self.cluster, self.page, self.lowest_first, self.min_conf, self.max_conf,
                            self.doubtful_first]
        self.page_outputs = [self.gallery, self.page_info, self.page_ids, self.page, self.page_keys]
        self.refresh = {"fn": self.first_page, "inputs": self.page_inputs, "outputs": self.page_outputs,
                        "api_visibility": "private"}
        self.refresh_choices = {"fn": friendly(lambda *values: fresh_choices(self.ws, *values)),
                                "inputs": self.choices, "outputs": self.choices, "api_visibility": "private", **QUIET}
        ctx.share(cluster=self.cluster, cluster_choices=self.choices, refresh_choices=self.refresh_choices,
                  show_cluster=self.refresh)
        ctx.demo.load(self.opening_choices, self.choices, self.choices, api_visibility="private")
        self._wire_browse()
        self._wire_curate()
        ctx.share(after_change=self.after_change)
        ctx.after_build(lambda: ctx["send_to_search"](self.inspected.neighbours, self.inspected.neighbour_ids))

    # ---- layout
    def _browse(self) -> None:
        with gr.Row():
            self.cluster = gr.Dropdown(cluster_choices(self.ws, True), value=None, label="Cluster",
                                       elem_id="cluster-choice", allow_custom_value=True)
            with gr.Column(min_width=240):
                self.lowest_first = gr.Checkbox(False, label="Lowest confidence first (finds the mistakes)",
                                                elem_id="lowest-first")
                self.doubtful_first = gr.Checkbox(False, label="Doubtful first (its neighbours sit elsewhere: "
                                                  "finds the confident mistakes)", elem_id="doubtful-first")
            self.min_conf = gr.Slider(0, 1, 0, step=0.01, label="Minimum confidence")
            self.max_conf = gr.Slider(0, 1, 1, step=0.01, label="Maximum confidence")
        with gr.Row():
            self.previous_page = gr.Button("◀ previous page", size="sm")
            self.page = gr.Number(0, precision=0, label="Page (from 0)", minimum=0)
            self.next_page = gr.Button("next page ▶", size="sm")
        self.page_info = gr.Markdown(elem_id="page-info")
        self.gallery = gr.Gallery(label="Images (click one to inspect it)", columns=10, allow_preview=False,
                                  height="auto", elem_id="cluster-gallery")
        self.page_ids = gr.State([])
        self.page_keys = gr.State([])  # the cursors of the page's first and last images: previous and next pages
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
            self.selection = gr.Textbox(label="Selected image ids (editable)", elem_id="selection")
            self.select_inspected = gr.Button("Select the inspected image", elem_id="select-inspected")
            self.select_page = gr.Button("Select the whole page", elem_id="select-page")
            self.clear = gr.Button("Clear selection")
        self.selection_gallery = gr.Gallery(label="Selection (click an image to drop it)", columns=15,
                                            fit_columns=False, allow_preview=False, height="auto",
                                            elem_id="selection-gallery", elem_classes=[FIT])
        self.selection_ids = gr.State([])
        with gr.Row():
            self.selection_count = gr.Markdown("0 selected", elem_id="selection-count")
            self.move_target = gr.Dropdown(cluster_choices(self.ws, False), value=None, label="Move the selection to",
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
    def open_cluster(self, cluster: int, page: int, lowest_first: bool, min_conf: float, max_conf: float,
                     doubtful_first: bool = False, after: Any = None, before: Any = None
                     ) -> tuple[list, str, list[int], int, list]:
        """A page by number, or (``after``/``before``: the next or previous page's cursor) by keyset."""
        cluster = cluster_number(cluster, "choose a cluster first")
        items, total = self.ws.cluster_page(cluster, int(page or 0), bool(lowest_first), float(min_conf),
                                            float(max_conf), bool(doubtful_first), as_cursor(after),
                                            as_cursor(before))
        pages = max(1, -(-total // PAGE_SIZE))
        page = min(max(0, int(page or 0)), pages - 1)
        order = ("most doubtful first (review score)" if doubtful_first
                 else f"{'lowest' if lowest_first else 'highest'} confidence first")
        info = (f"**{literal(self.ws.store.name(cluster))}**: {total:,} images in the confidence range · page "
                f"{page + 1} of {pages} · {order}")
        gallery = [(str(thumb), f"#{r.id} · {r.confidence or 0:.2f}") for r, thumb in items]
        keys = [[r.confidence, r.id] for r in (items[0][0], items[-1][0])] if items else []  # (confidence, id)
        return gallery, info, [r.id for r, _ in items], page, keys

    def next_or_previous(self, step: int, *values: Any) -> tuple:
        """The page next to the one shown, from its first or last image's cursor (by number in doubt order)."""
        *inputs, keys = values
        cluster, page, *rest = inputs
        target = max(0, int(page or 0) + step)
        if not keys or rest[-1] or target == int(page or 0):
            return self.open_cluster(cluster, target, *rest)
        return self.open_cluster(cluster, target, *rest, **({"after": keys[1]} if step > 0 else {"before": keys[0]}))

    @friendly
    def opening_choices(self, cluster: Any, sources: Any, target: Any) -> tuple[Any, Any, Any]:
        """On each page load: the dropdowns as the store is now, the cluster on the largest one (its page opens)."""
        return fresh_choices(self.ws, self.ws.largest_cluster(), sources, target)

    def first_page(self, *values: Any) -> tuple:
        return self.open_cluster(values[0], 0, *values[2:])

    def curation_result(self, message: str) -> tuple[str, str]:
        """The status line and the history; the dropdowns follow in ``refresh_choices`` (browser only)."""
        history = "\n".join(f"- {literal(line)}" for line in self.ws.store.history()) or "no changes yet"
        return literal(message), history

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

    def inspect_first(self, ids: list[int], current: Any) -> tuple:
        """Inspect the page's first image unless the inspected one is on the page: the panel is never empty."""
        if not ids or (current not in (None, "") and int(current) in ids):
            return gr.skip()
        return (ids[0], *self.select_image(ids[0]))

    def inspect_again(self, current: Any) -> tuple:
        """The inspected image once more after a change: its cluster's name and its neighbours' are current."""
        return gr.skip() if current in (None, "") else self.select_image(current)

    # ---- events
    def _wire_browse(self) -> None:
        inputs, outputs = self.page_inputs, self.page_outputs
        inspected = self.inspected
        self.select_image = image_selector(self.ws)
        first = {"fn": friendly(self.inspect_first), "inputs": [self.page_ids, inspected.image_id],
                 "outputs": [inspected.image_id, *inspected.outputs], "api_visibility": "private"}
        self.reinspect = {"fn": self.inspect_again, "inputs": [inspected.image_id], "outputs": inspected.outputs,
                          "api_visibility": "private", **QUIET}
        for trigger in (self.cluster.change, self.lowest_first.change, self.doubtful_first.change,
                        self.min_conf.release, self.max_conf.release):
            trigger(self.first_page, inputs, outputs, api_visibility="private", **QUIET).then(**first)
        self.page.submit(self.open_cluster, inputs, outputs, api_name="open_cluster", **QUIET).then(**first)
        self.previous_page.click(lambda *v: self.next_or_previous(-1, *v), [*inputs, self.page_keys], outputs,
                                 api_visibility="private", **QUIET).then(**first)
        self.next_page.click(lambda *v: self.next_or_previous(1, *v), [*inputs, self.page_keys], outputs,
                             api_visibility="private", **QUIET).then(**first)
        # one order at a time: checking one unchecks the other
        self.lowest_first.input(lambda on: gr.skip() if not on else False, [self.lowest_first], [self.doubtful_first],
                                api_visibility="private")
        self.doubtful_first.input(lambda on: gr.skip() if not on else False, [self.doubtful_first],
                                  [self.lowest_first], api_visibility="private")

        def image_clicked(ids: list[int], evt: gr.SelectData) -> int:
            return ids[evt.index]

        inspected.image_id.submit(self.select_image, [inspected.image_id], inspected.outputs, api_name="select_image",
                                  **QUIET)
        # always_last: a click made while the last one is still shown counts (Gradio's default dropped it)
        self.gallery.select(image_clicked, [self.page_ids], [inspected.image_id], api_visibility="private",
                            trigger_mode="always_last").then(
            self.select_image, [inspected.image_id], inspected.outputs, api_visibility="private", **QUIET)

    def _wire_curate(self) -> None:
        # first: a later private event of the same function would take its API name
        self.selection.change(self.show_selection, [self.selection],
                              [self.selection_gallery, self.selection_ids, self.selection_count],
                              api_name="show_selection", **QUIET)
        outputs = [self.status, self.history]
        selection = {"fn": self.show_selection, "inputs": [self.selection],
                     "outputs": [self.selection_gallery, self.selection_ids, self.selection_count],
                     "api_visibility": "private", **QUIET}  # its captions name the images' clusters
        self.after_change = after = (self.refresh_choices, {**self.refresh, **QUIET}, self.reinspect, selection)
        for button, fn, inputs, api in (
                (self.rename, self.rename_cluster, [self.cluster, self.new_name], "rename_cluster"),
                (self.merge, self.merge_clusters, [self.merge_sources, self.cluster], "merge_clusters"),
                (self.move, self.move_images, [self.selection, self.move_target], "move_images"),
                (self.exclude, self.exclude_images, [self.selection], "exclude_images"),
                (self.confirm, self.confirm_images, [self.selection, self.page_ids], "confirm_images"),
                (self.undo_button, self.undo, None, "undo")):
            event = button.click(fn, inputs, outputs, api_name=api, **QUIET)
            for step in after:
                event = event.then(**step)
        self.clear.click(lambda: "", None, [self.selection], api_visibility="private")
        self.select_inspected.click(self.add_inspected, [self.inspected.image_id, self.selection], [self.selection],
                                    api_visibility="private", **QUIET)
        self.select_page.click(lambda ids, chosen: ", ".join(map(str, dict.fromkeys([*parse_ids(chosen), *ids]))),
                               [self.page_ids, self.selection], [self.selection], api_visibility="private")

        def selection_clicked(ids: list[int], evt: gr.SelectData) -> str:
            return ", ".join(str(i) for position, i in enumerate(ids) if position != evt.index)

        self.selection_gallery.select(selection_clicked, [self.selection_ids], [self.selection],
                                      api_visibility="private", trigger_mode="always_last")

    @friendly
    def add_inspected(self, image_id: Any, chosen: str) -> str:
        """The inspected image joins the selection (once)."""
        if image_id in (None, ""):
            raise AppUserError("inspect an image first: click one in the gallery")
        return ", ".join(map(str, dict.fromkeys([*parse_ids(chosen), int(image_id)])))


def as_cursor(value: Any) -> tuple[float | None, int] | None:
    """A cursor kept in the page's state (a JSON list) as the workspace takes it: (confidence, id)."""
    if not value:
        return None
    confidence, image_id = value
    return (None if confidence is None else float(confidence)), int(image_id)
