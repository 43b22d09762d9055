"""The Review view: the images most likely in the wrong cluster first, each moved or kept with one click.

The order is the index's review score (:mod:`twist_core.label.review`: low margin, doubtful cluster, neighbours
in another cluster).
The image on the left of the page is the current one; "Move to ..." sends it to the cluster its neighbours
point to, "Keep" confirms it where it is, and either way it leaves the queue and the next image becomes the
current one. Both are ordinary curation changes (the Cluster view's Undo, or this view's, takes them back).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from app.views import ViewContext
from app.views.shared import (
    QUIET,
    cluster_choices,
    cluster_number,
    fresh_target,
    friendly,
    image_panel,
    image_selector,
    literal,
)
from app.workspace import PAGE_SIZE, Workspace

HELP = ("Images most likely in the wrong cluster come first: the model hesitates between two clusters, their "
        "cluster is one it is unsure of, or their nearest neighbours sit in another cluster. Click an image to make "
        "it the current one; **Move** or **Keep** takes it out of the queue and goes on with the next.")


def build(ctx: ViewContext) -> None:
    ReviewView(ctx)


class ReviewView:
    def __init__(self, ctx: ViewContext) -> None:
        self.ws: Workspace = ctx.ws
        self.select_image = image_selector(self.ws)
        with gr.Tab("Review", id="review") as self.tab:
            self._layout()
        self._wire(ctx)

    def _layout(self) -> None:
        gr.Markdown(HELP)
        with gr.Row():
            self.previous_page = gr.Button("◀ previous page", size="sm")
            self.page = gr.Number(0, precision=0, label="Page (from 0)", minimum=0, elem_id="review-page")
            self.next_page = gr.Button("next page ▶", size="sm")
        self.info = gr.Markdown(elem_id="review-info")
        self.gallery = gr.Gallery(label="To review, most likely wrong first (click one to make it current)",
                                  columns=10, allow_preview=False, height="auto", elem_id="review-gallery")
        self.ids, self.scores, self.suggestions = gr.State([]), gr.State([]), gr.State([])
        self.position = gr.State(0)
        with gr.Row():
            self.move_suggested = gr.Button("Move to the suggested cluster", variant="primary",
                                            elem_id="review-move-suggested")
            self.keep = gr.Button("Keep (it is right)", elem_id="review-keep")
            self.target = gr.Dropdown(cluster_choices(self.ws, False), value=None, label="…or move it to",
                                      elem_id="review-target", allow_custom_value=True)
            self.move = gr.Button("Move", elem_id="review-move")
            self.undo = gr.Button("Undo last change", elem_id="review-undo")
        self.status = gr.Markdown(elem_id="review-status")
        panel = image_panel("review", "Its nearest neighbours")
        self.current, self.detail_outputs = panel.image_id, panel.outputs

    # ---- handlers
    def show(self, page: Any, position: int = 0) -> tuple:
        """A page of the queue, with the image at ``position`` (or the last one) as the current image."""
        items, total = self.ws.review_page(int(page or 0))
        page = min(max(0, int(page or 0)), max(0, (total - 1) // PAGE_SIZE))
        names = self.ws.names()
        gallery = [(str(item.thumbnail), f"#{item.record.id} · {item.score:.2f} · {names.get(item.record.label, '')}"
                    f"{'' if item.suggestion is None else ' → ' + names.get(item.suggestion, '')}") for item in items]
        position = min(max(0, int(position)), max(0, len(items) - 1))
        current = items[position].record.id if items else None
        suggestion = items[position].suggestion if items else None
        info = (f"**{total:,} images to review** (not yet moved, excluded or kept) · page {page + 1} of "
                f"{max(1, -(-total // PAGE_SIZE))}")
        return (gallery, info, [i.record.id for i in items], [i.score for i in items], [i.suggestion for i in items],
                page, position,
                current, self.suggestion_button(suggestion))

    def suggestion_button(self, suggestion: int | None) -> Any:
        if suggestion is None:
            return gr.Button("no other cluster suggested", interactive=False)
        return gr.Button(f"Move to {self.ws.store.name(suggestion)}", interactive=True)

    def details(self, image_id: Any, ids: list[int], scores: list[float], suggestions: list[int | None]) -> tuple:
        """The current image's picture, details (with its review score), class chart and neighbours."""
        if image_id is None or image_id == "":
            return None, "", None, [], []
        picture, text, *rest = self.select_image(image_id)
        if int(image_id) in ids:
            at = ids.index(int(image_id))
            where = ("none of its neighbours is in another cluster" if suggestions[at] is None
                     else f"its neighbours point to {literal(self.ws.store.name(suggestions[at]))}")
            text += f"  \nreview score {scores[at]:.3f} · {where}"
        return (picture, text, *rest)

    def clicked(self, ids: list[int], suggestions: list[int | None], evt: gr.SelectData) -> tuple:
        return evt.index, ids[evt.index], self.suggestion_button(suggestions[evt.index])

    def act(self, change: Any, page: Any, position: int) -> tuple:
        """Apply a curation change, then show the page again with the next image current (the dropdowns here and
        in the Cluster view follow in later steps, browser only)."""
        message = change()
        return (literal(message), *self.show(page, position))

    def current_id(self, image_id: Any) -> int:
        if image_id is None or image_id == "":
            raise gr.Error("click an image of the queue first", print_exception=False)
        return int(image_id)

    # ---- events
    def _wire(self, ctx: ViewContext) -> None:
        page_outputs = [self.gallery, self.info, self.ids, self.scores, self.suggestions, self.page, self.position,
                        self.current, self.move_suggested]
        details = {"fn": self.details, "inputs": [self.current, self.ids, self.scores, self.suggestions],
                   "outputs": self.detail_outputs, "api_visibility": "private", **QUIET}
        show = friendly(self.show)
        self.tab.select(lambda page, position: show(page, position), [self.page, self.position], page_outputs,
                        api_visibility="private").then(**details)
        self.page.submit(lambda page: show(page), [self.page], page_outputs, api_name="review_page").then(**details)
        self.previous_page.click(lambda page: show(max(0, int(page or 0) - 1)), [self.page], page_outputs,
                                 api_visibility="private").then(**details)
        self.next_page.click(lambda page: show(int(page or 0) + 1), [self.page], page_outputs,
                             api_visibility="private").then(**details)
        self.gallery.select(self.clicked, [self.ids, self.suggestions],
                            [self.position, self.current, self.move_suggested], api_visibility="private",
                            trigger_mode="always_last").then(**details)

        @friendly
        def move_suggested(image_id: Any, suggestions: list[int | None], position: int, page: Any) -> tuple:
            target = suggestions[int(position)] if suggestions and int(position) < len(suggestions) else None
            if target is None:
                raise gr.Error("no other cluster is suggested for this image: choose one to move it to",
                               print_exception=False)
            return self.act(lambda: self.ws.move([self.current_id(image_id)], target), page, position)

        @friendly
        def move_to(image_id: Any, target: Any, position: int, page: Any) -> tuple:
            target = cluster_number(target, "choose the cluster to move the image to")
            return self.act(lambda: self.ws.move([self.current_id(image_id)], target), page, position)

        @friendly
        def keep(image_id: Any, position: int, page: Any) -> tuple:
            return self.act(lambda: self.ws.keep([self.current_id(image_id)]), page, position)

        @friendly
        def undo(position: int, page: Any) -> tuple:
            return self.act(self.ws.undo, page, position)

        def wire_changes() -> None:
            outputs = [self.status, *page_outputs]
            target = {"fn": friendly(lambda value: fresh_target(self.ws, value)), "inputs": [self.target],
                      "outputs": [self.target], "api_visibility": "private", **QUIET}
            for event in (
                    self.move_suggested.click(move_suggested, [self.current, self.suggestions, self.position,
                                                               self.page], outputs, api_name="review_move_suggested",
                                              **QUIET),
                    self.move.click(move_to, [self.current, self.target, self.position, self.page], outputs,
                                    api_name="review_move", **QUIET),
                    self.keep.click(keep, [self.current, self.position, self.page], outputs, api_name="review_keep",
                                    **QUIET),
                    self.undo.click(undo, [self.position, self.page], outputs, api_visibility="private", **QUIET)):
                event = event.then(**details).then(**target)
                for step in ctx["after_change"]:
                    event = event.then(**step)

        ctx.after_build(wire_changes)
