"""Suggested merges over the clusters as curated now, for the app: the measures, the plan, and applying them.

The suggestions are computed over the current clusters of a fixed random sample of the images (the index
generation's, at most ``SAMPLE_IMAGES``: the view says so), so a merge made anywhere in the app is respected,
and a merge goes through the curation store like any other: the app's "Undo last change" takes it back. A plan
down to N clusters (``twist suggest-merges --to N``) is applied as one change of the store, so one Undo takes it back.

A model trained with ``--coarse-classes`` adds the measure ``heads`` and starts with it: the fine clusters are
grouped the way the model's coarse heads group them (one pass of the model over the images, kept per model).
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from app.results import AppUserError
from twist_core.curate import merges
from twist_core.curate.curation import EXCLUDED
from twist_core.curate.merges import DEFAULT_MEASURE, MergePlan, Suggestions

if TYPE_CHECKING:
    from app.workspace import Workspace

__all__ = ["BOOTSTRAP", "DEFAULT_MEASURE", "MergeAdvisor", "MergePlan", "Suggestions"]

BOOTSTRAP = 100  # resamples for the K estimate's range (the command's default is 200)
COVER_IMAGES = 4  # most confident images under each leaf of the dendrogram
SAMPLE_IMAGES = 20_000  # images the suggestions are computed on: the generation's fixed random sample


class MergeAdvisor:
    """The merge suggestions of one workspace; the coarse heads' shares are computed once per model."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self._shares: dict[str, list[np.ndarray]] = {}  # model checkpoint -> the coarse heads' shares
        self._lock = threading.Lock()

    def measures(self) -> tuple[str, ...]:
        """The measures offered: ``heads`` too (and first) when the model has coarse heads."""
        return (merges.HEADS, *merges.MEASURES) if self.ws.model.coarse_classes else merges.MEASURES

    def _evidence(self, data: merges.ClusterData, measure: str) -> merges.Evidence | None:
        """The evidence of ``measure`` when it needs the model (heads: its shares, computed once per model)."""
        if measure not in self.measures():
            raise AppUserError(f"measure must be one of {', '.join(self.measures())}")
        if measure != merges.HEADS:
            return None
        key = str(self.ws.model.card.get("checkpoint_sha256"))
        with self._lock:
            if key not in self._shares:
                self._shares[key] = merges.model_evidence(self.ws.index_dir, data, merges.HEADS,  # type: ignore[assignment]
                                                          progress=False)
        return merges.gather_evidence(data, merges.HEADS, coarse_shares=self._shares[key])

    def sample_note(self) -> str:
        """Which images the suggestions are computed on, for the view (a sample beyond ``SAMPLE_IMAGES``)."""
        total = self.ws.index.size
        if total <= SAMPLE_IMAGES:
            return f"computed on all {total:,} images"
        return (f"computed on a fixed random sample of {SAMPLE_IMAGES:,} of the {total:,} images (the sizes are the "
                "sample's; the clusters' own sizes are on the Clusters tab)")

    def _data(self) -> merges.ClusterData:
        """The sample's current labels, stored vectors and top clusters (excluded images left out): memory and
        time stay those of ``SAMPLE_IMAGES`` images at any N, where every image's vector used to be read."""
        store, index = self.ws.store, self.ws.index
        records = store.records(store.sample(SAMPLE_IMAGES))
        kept = sorted(i for i, r in records.items() if r.label is not None and r.label != EXCLUDED)
        vectors = np.stack([index.vector(i) for i in kept]) if kept else np.zeros((0, index.dim), np.float32)
        return merges.cluster_data(np.array(kept, np.int64), np.array([records[i].label for i in kept], np.int64),
                                   vectors, [records[i].topk for i in kept], store.names(), store.merges())

    def _suggest(self, measure: str, **options: Any) -> Suggestions:
        try:
            data = self._data()
            return merges.suggest(data, measure, evidence=self._evidence(data, measure), **options)
        except merges.MergeUserError as error:
            raise AppUserError(str(error)) from None

    def suggestions(self, measure: str = DEFAULT_MEASURE) -> Suggestions:
        """Merge suggestions and the K estimate over the current (curated) clusters."""
        return self._suggest(measure, resamples=BOOTSTRAP)

    def stamp(self) -> str:
        """Changes when the clusters do: the index generation and the latest curation change (an undo too)."""
        return f"{self.ws.index.generation} {self.ws.store.history(1)}"

    def merge_pair(self, a: int, b: int) -> str:
        """Merge the smaller cluster of the pair into the larger (which keeps its name), through the store."""
        sizes = {c["cluster"]: c["size"] for c in self.ws.store.summary()}
        a, b = int(a), int(b)
        if a == b or a not in sizes or b not in sizes:
            raise AppUserError(f"clusters {a} and {b} are not two current clusters: compute the suggestions again")
        into, source = (a, b) if sizes[a] >= sizes[b] else (b, a)
        names = self.ws.names()
        self.ws.merge([source], into)
        return (f"merged {names.get(source, source)!r} ({sizes[source]:,}) into {names.get(into, into)!r} "
                f"({sizes[into]:,})")

    def plan(self, to: Any, measure: str = DEFAULT_MEASURE) -> tuple[Suggestions, MergePlan]:
        """The plan down to ``to`` clusters over the current clusters (``twist suggest-merges --to``)."""
        current = sum(c["cluster"] != EXCLUDED for c in self.ws.store.summary())  # excluded images are no cluster
        try:
            target = int(to)
        except (TypeError, ValueError):
            raise AppUserError("give the number of clusters to merge down to") from None
        if not 1 <= target < current:
            raise AppUserError(f"merge down to a number from 1 to {current - 1} (there are {current} clusters now)")
        result = self._suggest(measure, resamples=0, to=target)
        return result, result.plan  # type: ignore[return-value]

    @staticmethod
    def plan_lines(result: Suggestions, plan: MergePlan) -> list[str]:
        """The plan's groups as the command prints them, one line per group (``into <- merged, ...``)."""
        return [line.strip() for line in merges.format_plan(result, plan).splitlines()]

    def apply_plan(self, plan_json: str) -> str:
        """Apply a previewed plan (its groups as JSON) as one change; refused if its clusters are no longer current."""
        try:
            groups = [[int(c) for c in group] for group in json.loads(plan_json or "")]
        except (TypeError, ValueError):
            raise AppUserError("preview a plan first") from None
        merged = [group for group in groups if len(group) > 1]
        sizes = {c["cluster"]: c["size"] for c in self.ws.store.summary()}
        if not merged:
            raise AppUserError("the plan merges nothing: preview a plan first")
        if any(c not in sizes for group in groups for c in group):
            raise AppUserError("the clusters changed since the plan was made: preview it again")
        names = self.ws.names()
        self.ws.store.merge_groups([(group[1:], group[0]) for group in merged],
                                   f"applied a merge plan down to {len(groups)} clusters: " + "; ".join(
                                       f"{', '.join(names.get(c, str(c)) for c in group[1:])} into "
                                       f"{names.get(group[0])}" for group in merged))
        return (f"applied the plan: {sum(len(g) - 1 for g in merged)} cluster(s) merged, {len(groups)} clusters now "
                "(one Undo takes the whole plan back)")

    def dendrogram(self, result: Suggestions) -> Image.Image:
        """The hierarchy with each cluster's cover (its most confident images) under its leaf."""
        ws = self.ws
        covers = {c: [ws.thumbnail(r) for r in ws.store.page(c, limit=COVER_IMAGES)] for c in result.clusters}
        out = merges.draw_dendrogram(result, ws.exports_dir / "suggested-merges.png", covers)
        with Image.open(out) as picture:
            return picture.convert("RGB")
