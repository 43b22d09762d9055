"""The "Changes" view: what a new model (after ``twist finetune``) changed against a previous one.

It shows what :meth:`app.workspace.Workspace.changes_since` finds (:mod:`app.label_changes`): images per cluster
before and after, and the images whose cluster changed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.label_changes import Changes, ChangesError

if TYPE_CHECKING:
    from app.views import ViewContext
    from app.workspace import Workspace

SHOWN_CHANGES = 60  # changed images shown in the gallery
COUNT_COLUMNS = ["cluster", "before", "after", "change"]


def summary_text(changes: Changes) -> str:
    """How many images changed cluster, and how many of them the gallery shows."""
    counts = (f"(only in the previous labelling: {changes.only_before:,}; only in the open index: "
              f"{changes.only_after:,})")
    if not changes.changed:
        return f"**No image changed cluster** among the {changes.compared:,} images in both {counts}."
    shown = ("All are shown below." if len(changes.changed) <= SHOWN_CHANGES
             else f"The first {SHOWN_CHANGES} are shown below.")
    return f"**{len(changes.changed):,} of {changes.compared:,} images changed cluster** {counts}. {shown}"


def gallery_items(ws: Workspace, changes: Changes) -> list[tuple[str, str]]:
    """Thumbnails of the first changed images that the open index holds, captioned ``#id · before → after``."""
    return [(str(ws.thumbnail(record)), f"#{record.id} · {before} → {after}")
            for record, before, after in ws.changed_images(changes, SHOWN_CHANGES)]


def build(ctx: ViewContext) -> None:
    """The tab: a previous labels table or index folder in, counts per cluster and the changed images out."""
    import gradio as gr
    import pandas as pd

    from app.views.shared import FIT, QUIET, WHOLE_CAPTIONS, friendly, literal

    ws = ctx.ws

    @friendly
    def compare_models(previous: str) -> tuple[str, pd.DataFrame, list[tuple[str, str]]]:
        try:
            changes = ws.changes_since(previous)
        except ChangesError as error:
            raise gr.Error(literal(error), print_exception=False) from None
        return (summary_text(changes), pd.DataFrame(changes.counts, columns=COUNT_COLUMNS),
                gallery_items(ws, changes))

    @friendly
    def compare_again(previous: str) -> tuple:
        """On each visit, the last comparison again with the names and clusters as curated now."""
        return compare_models(previous) if str(previous or "").strip() else gr.skip()

    with gr.Tab("Changes", id="changes") as tab:
        gr.Markdown("Compare the open index with an earlier labelling of the same images (for example the labels "
                    "table of the model before `twist finetune`): clusters are matched by name.")
        with gr.Row():
            previous = gr.Textbox(label="Previous labels table (.csv/.jsonl/.parquet of twist label) or index folder: "
                                        "a name beside the index, or a path in the image or state folder",
                                  elem_id="changes-previous")
            button = gr.Button("Compare", elem_id="changes-compare")
        summary = gr.Markdown(elem_id="changes-summary")
        table = gr.Dataframe(pd.DataFrame(columns=COUNT_COLUMNS), label="Images per cluster, before and after",
                             interactive=False, elem_id="changes-table")
        gallery = gr.Gallery(label="Images whose cluster changed (previous → now)", columns=10, fit_columns=False,
                             allow_preview=False, height="auto", elem_id="changes-gallery",
                             elem_classes=[FIT, WHOLE_CAPTIONS], visible=False)

    def shown_if_any(items: list | None) -> gr.Gallery:
        """No empty box when no image changed cluster (a step of its own: the API keeps the plain list)."""
        return gr.Gallery(visible=bool(items))

    for event in (button.click(compare_models, [previous], [summary, table, gallery], api_name="compare_models",
                               **QUIET),
                  previous.submit(compare_models, [previous], [summary, table, gallery], api_visibility="private",
                                  **QUIET),
                  tab.select(compare_again, [previous], [summary, table, gallery], api_visibility="private",
                             **QUIET)):
        event.then(shown_if_any, [gallery], [gallery], api_visibility="private", **QUIET)
