"""The "Suggested merges" view: which clusters of an over-clustered model belong together, merged with one click.

The suggestions are computed over the clusters as curated now (:func:`twist_core.curate.merges.data_from_index` with
the workspace's store), so a merge made here or in the Cluster view is respected, and a merge goes through
the curation store like any other: the app's "Undo last change" takes it back.

"Merge down to N clusters" previews the plan of ``twist suggest-merges --to N`` (which clusters join which
group) and applies it as one change of the store: one Undo takes the whole plan back.

A model trained with ``--coarse-classes`` adds the measure ``heads`` and starts with it: the fine clusters are
grouped the way the model's coarse heads group them (one pass of the model over the images, kept for the
model's lifetime in the app).
"""

from __future__ import annotations

import json
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image

from app.views import ViewContext
from app.views.shared import FIT, QUIET, friendly, literal
from app.workspace import AppUserError, Workspace
from twist_core.curate import merges
from twist_core.curate.curation import EXCLUDED

PAIRS_SHOWN = 30  # ranked pairs in the table and the chooser
PAIR_THUMBNAILS = 6  # most confident images of each cluster of the chosen pair
BOOTSTRAP = 100  # resamples for the K estimate's range (the command's default is 200)


_SHARES: dict[tuple[str, str], list[np.ndarray]] = {}  # (index, model's checkpoint) -> the coarse heads' shares


def measures(ws: Workspace) -> tuple[str, ...]:
    """The measures the app offers: ``heads`` too (and first) when the model has coarse heads."""
    return (merges.HEADS, *merges.MEASURES) if ws.model.coarse_classes else merges.MEASURES


def evidence_for(ws: Workspace, data: merges.ClusterData, measure: str) -> merges.Evidence | None:
    """The evidence of ``measure`` when it needs the model (heads: its shares, computed once per model)."""
    if measure not in measures(ws):
        raise AppUserError(f"measure must be one of {', '.join(measures(ws))}")
    if measure != merges.HEADS:
        return None
    key = (str(ws.index_dir), str(ws.model.card.get("checkpoint_sha256")))
    if key not in _SHARES:
        _SHARES[key] = merges.model_evidence(ws.index_dir, data, merges.HEADS, progress=False)  # type: ignore[assignment]
    return merges.gather_evidence(data, merges.HEADS, coarse_shares=_SHARES[key])


def suggestions(ws: Workspace, measure: str = merges.DEFAULT_MEASURE) -> merges.Suggestions:
    """Merge suggestions and the K estimate over the current (curated) clusters."""
    try:
        data = merges.data_from_index(ws.index_dir, store=ws.store)
        return merges.suggest(data, measure, resamples=BOOTSTRAP, evidence=evidence_for(ws, data, measure))
    except merges.MergeUserError as error:
        raise AppUserError(str(error)) from None


def merge_pair(ws: Workspace, a: int, b: int) -> str:
    """Merge the smaller cluster of the pair into the larger (which keeps its name), through the curation store."""
    sizes = {c["cluster"]: c["size"] for c in ws.store.summary()}
    a, b = int(a), int(b)
    if a == b or a not in sizes or b not in sizes:
        raise AppUserError(f"clusters {a} and {b} are not two current clusters: compute the suggestions again")
    into, source = (a, b) if sizes[a] >= sizes[b] else (b, a)
    names = ws.names()
    ws.merge([source], into)
    return f"merged {names.get(source, source)!r} ({sizes[source]:,}) into {names.get(into, into)!r} ({sizes[into]:,})"


def merge_plan(ws: Workspace, to: Any, measure: str = merges.DEFAULT_MEASURE) -> tuple[merges.Suggestions,
                                                                                        merges.MergePlan]:
    """The plan down to ``to`` clusters over the current clusters (``twist suggest-merges --to``)."""
    current = sum(c["cluster"] != EXCLUDED for c in ws.store.summary())  # excluded images are no cluster
    try:
        target = int(to)
    except (TypeError, ValueError):
        raise AppUserError("give the number of clusters to merge down to") from None
    if not 1 <= target < current:
        raise AppUserError(f"merge down to a number from 1 to {current - 1} (there are {current} clusters now)")
    try:
        data = merges.data_from_index(ws.index_dir, store=ws.store)
        result = merges.suggest(data, measure, resamples=0, to=target, evidence=evidence_for(ws, data, measure))
    except merges.MergeUserError as error:
        raise AppUserError(str(error)) from None
    return result, result.plan  # type: ignore[return-value]


def plan_text(result: merges.Suggestions, plan: merges.MergePlan) -> str:
    """The plan's groups as the command prints them, one line per group (``into <- merged, ...``), as text."""
    return "  \n".join(literal(line.strip()) for line in merges.format_plan(result, plan).splitlines())


def apply_plan(ws: Workspace, plan_json: str) -> str:
    """Apply a previewed plan (its groups as JSON) as one change; refused if its clusters are no longer current."""
    try:
        groups = [[int(c) for c in group] for group in json.loads(plan_json or "")]
    except (TypeError, ValueError):
        raise AppUserError("preview a plan first") from None
    merged = [group for group in groups if len(group) > 1]
    sizes = {c["cluster"]: c["size"] for c in ws.store.summary()}
    if not merged:
        raise AppUserError("the plan merges nothing: preview a plan first")
    if any(c not in sizes for group in groups for c in group):
        raise AppUserError("the clusters changed since the plan was made: preview it again")
    names = ws.names()
    ws.store.merge_groups([(group[1:], group[0]) for group in merged],
                          f"applied a merge plan down to {len(groups)} clusters: " + "; ".join(
                              f"{', '.join(names.get(c, str(c)) for c in group[1:])} into {names.get(group[0])}"
                              for group in merged))
    return (f"applied the plan: {sum(len(g) - 1 for g in merged)} cluster(s) merged, {len(groups)} clusters now "
            "(one Undo takes the whole plan back)")


def curation_stamp(ws: Workspace) -> str:
    """Changes when the clusters do: the index generation and the latest curation change (an undo too)."""
    return f"{ws.index.generation} {ws.store.history(1)}"


def dendrogram_picture(ws: Workspace, result: merges.Suggestions) -> Image.Image:
    """The hierarchy with each cluster's cover (its most confident images) under its leaf."""
    covers = {c: [ws.thumbnail(r) for r in ws.store.page(c, limit=4)] for c in result.clusters}
    out = merges.draw_dendrogram(result, ws.exports_dir / "suggested-merges.png", covers)
    with Image.open(out) as picture:
        return picture.convert("RGB")


def estimate_text(result: merges.Suggestions) -> str:
    estimate = result.k_estimate
    if estimate is None:
        return f"{len(result.clusters)} clusters: too few to estimate how many groups there are."
    return (f"**Estimated number of groups: {estimate.k}** (range {estimate.low}-{estimate.high} over "
            f"{estimate.resamples} bootstrap resamples of the images; {estimate.support:.0%} of them gave "
            f"{estimate.k}) from {len(result.clusters)} current clusters. Measure: {result.measure}.")


PAIR_COLUMNS = ["rank", "cluster A", "size A", "cluster B", "size B", "similarity"]


def pairs_table(result: merges.Suggestions) -> pd.DataFrame:
    rows = [{"rank": rank, "cluster A": result.label(a), "size A": result.sizes[a], "cluster B": result.label(b),
             "size B": result.sizes[b], "similarity": round(s, 4)}
            for rank, (a, b, s) in enumerate(result.pairs[:PAIRS_SHOWN], 1)]
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)  # the headers even when there is no pair


def pair_choices(result: merges.Suggestions) -> list[tuple[str, str]]:
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

    def shown(result: merges.Suggestions, message: str) -> tuple:
        choices = pair_choices(result)
        first = choices[0][1] if choices else None
        gallery = pair_gallery(ws, *parse_pair(first)) if first else []
        return (estimate_text(result), dendrogram_picture(ws, result), pairs_table(result),
                gr.Dropdown(choices=choices, value=first), gallery, literal(message))

    @friendly
    def show_pair(value: str) -> list[tuple[str, str]]:
        return pair_gallery(ws, *parse_pair(value)) if value else []

    @friendly
    def merge_suggestion(value: str, measure: str) -> tuple:
        message = merge_pair(ws, *parse_pair(value))
        return shown(suggestions(ws, measure), message)

    @friendly
    def undo_here(measure: str) -> tuple:
        message = ws.undo()
        return shown(suggestions(ws, measure), message)

    @friendly
    def suggest_with_target(measure: str) -> tuple:
        result = suggestions(ws, measure)
        estimate = result.k_estimate.k if result.k_estimate else len(result.clusters) - 1
        return (*shown(result, ""), min(max(1, estimate), max(1, len(result.clusters) - 1)))

    @friendly
    def suggest_when_changed(measure: str, shown_for: Any) -> tuple:
        """On a visit: the suggestions again only if the clusters changed since they were computed (the bootstrap
        of a large index takes a while)."""
        now = curation_stamp(ws)
        return gr.skip() if now == shown_for else (*suggest_with_target(measure), now)

    @friendly
    def preview_plan(to: Any, measure: str) -> tuple[str, str, str]:
        result, plan = merge_plan(ws, to, measure)
        return plan_text(result, plan), json.dumps(plan.groups), ""

    @friendly
    def apply_previewed(plan_json: str, measure: str) -> tuple:
        message = apply_plan(ws, plan_json)
        return (*shown(suggestions(ws, measure), message), "", "")

    with gr.Tab("Suggested merges", id="merges") as tab:
        with gr.Row():
            offered = measures(ws)
            measure = gr.Radio(list(offered), value=offered[0], elem_id="merge-measure",
                               label="Similarity of two clusters (heads: they share the model's coarse clusters; "
                                     "modularity: nearest-neighbour links beyond what their sizes predict; knn: "
                                     "share of one's neighbour links in the other; topk: shared probability; "
                                     "centroid: cosine of the mean embeddings)")
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
        shown_for = gr.State(None)  # the curation_stamp the shown suggestions were computed for

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
