"""The Clusters view: the dataset's summary and one card per cluster; a click on a card opens that cluster.

Drawn on each page load and each visit, so names, sizes and covers follow the curation made in other tabs.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from app.views import ViewContext
from app.views.shared import FIT, QUIET, WHOLE_CAPTIONS, friendly, literal
from twist_core.curate.curation import EXCLUDED

SORTS = ["size", "confidence", "lowest confidence", "cluster"]
TABLE_COLUMNS = ["cluster", "name", "size", "mean confidence"]


def build(ctx: ViewContext) -> None:
    ws = ctx.ws

    @friendly
    def overview(sort: str) -> tuple[list, pd.DataFrame, str, list[int]]:
        cards = ws.overview(sort)
        items = [(str(c["cover"]), f"{c['cluster']} · {c['name']} · {c['size']:,} images · "
                                   f"conf {c['mean_confidence'] or 0:.2f}") for c in cards]
        table = pd.DataFrame([{"cluster": c["cluster"], "name": c["name"], "size": c["size"],
                               "mean confidence": round(c["mean_confidence"] or 0, 4)} for c in cards],
                             columns=TABLE_COLUMNS)
        s = ws.dataset_summary()
        clustered = sum(c["cluster"] != EXCLUDED for c in cards)  # the excluded images' card is no cluster
        summary = (f"**{s['images']:,} images** in {clustered} non-empty clusters (model: {s['clusters']}) · "
                   f"skipped files: {'unknown' if s['skipped'] is None else s['skipped']} · folder "
                   f"{literal(s['root'])}  \nmodel {literal(s['model'])}: {literal(s['backbone'])}, "
                   f"{s['embedding_dim']}-d embeddings, {s['input_size']} px input, epoch {s['checkpoint_epoch']}, "
                   f"checkpoint {literal(s['checkpoint_sha256'])} · {literal(s['index_kind'])} index"
                   + (f"  \n**Note:** {literal(s['notice'])}" if s["notice"] else ""))
        return items, table, summary, [c["cluster"] for c in cards]

    with gr.Tab("Clusters", id="clusters") as tab:
        summary = gr.Markdown(elem_id="summary")
        sort = gr.Radio(SORTS, value="size", label="Sort clusters by")
        cards = gr.Gallery(label="Clusters (click one to open it)", columns=5, allow_preview=False,
                           object_fit="contain", height="auto", elem_id="cluster-cards",
                           elem_classes=[FIT, WHOLE_CAPTIONS])
        table = gr.Dataframe(pd.DataFrame(columns=TABLE_COLUMNS), interactive=False, label="Clusters",
                             elem_id="clusters-table")
        card_ids = gr.State([])

    overview_io = {"inputs": [sort], "outputs": [cards, table, summary, card_ids]}
    ctx.demo.load(overview, **overview_io, api_name="overview")
    sort.change(overview, **overview_io, api_visibility="private", **QUIET)
    tab.select(overview, **overview_io, api_visibility="private", **QUIET)

    def card_clicked(ids: list[int], evt: gr.SelectData) -> tuple[int, Any]:
        return ids[evt.index], gr.Tabs(selected="cluster")

    ctx.after_build(lambda: cards.select(card_clicked, [card_ids], [ctx["cluster"], ctx.tabs],
                                         api_visibility="private"))
