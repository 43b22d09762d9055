"""The "Suggested merges" view: which clusters of an over-clustered model belong together, merged with one click.

It renders what the workspace's :class:`app.merging.MergeAdvisor` computes (suggestions over the clusters as
curated now, a plan down to N clusters, applied as one change that one Undo takes back).
"""

from __future__ import annotations

import json
from typing import Any

import gradio as gr
import pandas as pd

from app.merging import MergeAdvisor, MergePlan, Suggestions
from app.views import ViewContext
from app.views.shared import FIT, QUIET, friendly, literal
from app.workspace import AppUserError, Workspace

PAIRS_SHOWN = 30  # ranked pairs in the table and the chooser
PAIR_THUMBNAILS = 6  # most confident images of each cluster of the chosen pair


def plan_text(result: Suggestions, plan: MergePlan) -> str:
    """The plan's groups as the command prints them, one line per group, as text."""
    return "  \n".join(literal(line) for line in MergeAdvisor.plan_lines(result, plan))


def estimate_text(result: Suggestions, sample: str) -> str:
    """The K estimate, and which images the suggestions were computed on (``sample``)."""
    estimate = result.k_estimate
    if estimate is None:
        return f"{len(result.clusters)} clusters: too few to estimate how many groups there are ({sample})."
    return (f"**Estimated number of groups: {estimate.k}** (range {estimate.low}-{estimate.high} over "
            f"{estimate.resamples} bootstrap resamples of the images; {estimate.support:.0%} of them gave "
            f"{estimate.k}) from {len(result.clusters)} current clusters. Measure: {result.measure}; {sample}.")


PAIR_COLUMNS = ["rank", "cluster A", "size A", "cluster B", "size B", "similarity"]


def pairs_table(result: Suggestions) -> pd.DataFrame:
    rows = [{"rank": rank, "cluster A": result.label(a), "size A": result.sizes[a], "cluster B": result.label(b),
             "size B": result.sizes[b], "similarity": round(s, 4)}
            for rank, (a, b, s) in enumerate(result.pairs[:PAIRS_SHOWN], 1)]
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)  # the headers even when there is no pair


def pair_choices(result: Suggestions) -> list[tuple[str, str]]:
    return [(f"{rank}. {result.label(a)} ({result.sizes[a]:,}) + {result.label(b)} ({result.sizes[b]:,})",
             f"{a},{b}") for rank, (a, b, _) in enumerate(result.pairs[:PAIRS_SHOWN], 1)]


def parse_pair(value: Any) -> tuple[int, int]:
    try:
        a, b = (int(part) for part in str(value).split(","))
    except (TypeError, ValueError):
        raise AppUserError("choose a suggested pair first") from None
    return a, b


def pair_gallery(ws: Workspace, a: int, b: int) -> list[tuple[str, str]]:
    """The most confident images of both clusters of a pair, side by side."""
    names = ws.names()
    return [(str(ws.thumbnail(record)), f"{cluster} · {names.get(cluster, '')}")
            for cluster in (a, b) for record in ws.store.page(cluster, limit=PAIR_THUMBNAILS)]


def build(ctx: ViewContext) -> None:
    """The tab, its events, and after a merge or undo a refresh of the Cluster view's dropdowns and page."""
    ws = ctx.ws

    def shown(result: Suggestions, message: str) -> tuple:
        choices = pair_choices(result)
        first = choices[0][1] if choices else None
        gallery = pair_gallery(ws, *parse_pair(first)) if first else []
        return (estimate_text(result, ws.merging.sample_note()), ws.merging.dendrogram(result), pairs_table(result),
                gr.Dropdown(choices=choices, value=first), gallery, literal(message))

    @friendly
    def show_pair(value: str) -> list[tuple[str, str]]:
        return pair_gallery(ws, *parse_pair(value)) if value else []

    @friendly
    def merge_suggestion(value: str, measure: str) -> tuple:
        message = ws.merging.merge_pair(*parse_pair(value))
        return shown(ws.merging.suggestions(measure), message)

    @friendly
    def undo_here(measure: str) -> tuple:
        message = ws.undo()
        return shown(ws.merging.suggestions(measure), message)

    @friendly
    def suggest_with_target(measure: str) -> tuple:
        result = ws.merging.suggestions(measure)
        estimate = result.k_estimate.k if result.k_estimate else len(result.clusters) - 1
        return (*shown(result, ""), min(max(1, estimate), max(1, len(result.clusters) - 1)))

    @friendly
    def suggest_when_changed(measure: str, shown_for: Any) -> tuple:
        """On a visit: the suggestions again only if the clusters changed since they were computed (the bootstrap
        of a large index takes a while)."""
        now = ws.merging.stamp()
        return gr.skip() if now == shown_for else (*suggest_with_target(measure), now)

    @friendly
    def preview_plan(to: Any, measure: str) -> tuple[str, str, str]:
        result, plan = ws.merging.plan(to, measure)
        return plan_text(result, plan), json.dumps(plan.groups), ""

    @friendly
    def apply_previewed(plan_json: str, measure: str) -> tuple:
        message = ws.merging.apply_plan(plan_json)
        return (*shown(ws.merging.suggestions(measure), message), "", "")

    with gr.Tab("Suggested merges", id="merges") as tab:
        with gr.Row():
            offered = ws.merging.measures()
            measure = gr.Radio(list(offered), value=offered[0], elem_id="merge-measure",
                               label="Similarity of two clusters (heads: they share the model's coarse clusters; "
                                     "modularity: nearest-neighbour links beyond what their sizes predict)")
            compute = gr.Button("Suggest merges", variant="primary", elem_id="suggest-merges")
        estimate = gr.Markdown(elem_id="merge-estimate")
        picture = gr.Image(type="pil", interactive=False, label="Clusters as a hierarchy (dashed: the estimated cut)",
                           elem_id="merge-dendrogram", buttons=["download"])
        table = gr.Dataframe(pd.DataFrame(columns=PAIR_COLUMNS), interactive=False, label="Most similar pairs first",
                             elem_id="merge-pairs")
        with gr.Row():
            pair = gr.Dropdown([], value=None, label="Pair", elem_id="merge-pair", allow_custom_value=True, scale=3)
            merge = gr.Button("Merge this pair", elem_id="merge-pair-button", scale=1)
            undo_button = gr.Button("Undo last change", elem_id="merge-undo", scale=1)
        gallery = gr.Gallery(label="The pair's most confident images (a row per cluster)", columns=PAIR_THUMBNAILS,
                             fit_columns=False, allow_preview=False, height="auto", elem_id="merge-pair-gallery",
                             elem_classes=[FIT])
        with gr.Row():
            plan_to = gr.Number(None, precision=0, label="Merge down to N clusters (default: the "
                                "estimate)", elem_id="merge-plan-to", scale=2)
            preview = gr.Button("Preview the plan", elem_id="merge-plan-preview", scale=1)
            apply = gr.Button("Apply the plan", variant="primary", elem_id="merge-plan-apply", scale=1)
        plan_view = gr.Markdown(elem_id="merge-plan")
        plan_groups = gr.Textbox(visible=False, elem_id="merge-plan-groups")  # the previewed plan, as applied
        status = gr.Markdown(elem_id="merge-status")
        shown_for = gr.State(None)  # the stamp (MergeAdvisor.stamp) the shown suggestions were computed for

    outputs = [estimate, picture, table, pair, gallery, status]
    compute.click(suggest_with_target, [measure], [*outputs, plan_to], api_name="suggest_merges")
    # computed on opening (N at the estimate), and again on a visit after the clusters changed
    tab.select(suggest_when_changed, [measure, shown_for], [*outputs, plan_to, shown_for], api_visibility="private")
    pair.input(show_pair, [pair], [gallery], api_visibility="private", **QUIET)
    preview.click(preview_plan, [plan_to, measure], [plan_view, plan_groups, status], api_name="preview_plan",
                  **QUIET)

    def refresh_other_views() -> None:
        """A merge here changes the clusters the Cluster view lists: bring that view up to date."""
        for event in (merge.click(merge_suggestion, [pair, measure], outputs, api_name="merge_suggestion", **QUIET),
                      undo_button.click(undo_here, [measure], outputs, api_visibility="private", **QUIET),
                      apply.click(apply_previewed, [plan_groups, measure], [*outputs, plan_view, plan_groups],
                                  api_name="apply_plan", **QUIET)):
            for step in ctx["after_change"]:
                event = event.then(**step)

    ctx.after_build(refresh_other_views)
