"""The cleaning app's embedding map: a 2D projection of the cached embeddings drawn with bqplot,
coloured by given label, predicted label or issue; a box selection (bqplot's BrushSelector) filters
the grid to the images inside it, and the selection can be kept, deleted or relabelled at once.

At most `explore.PLOT_CAP` points are drawn (a seeded sample, SVG stays quick in the browser); the
box selects among *all* images by their coordinates, drawn or not."""

from __future__ import annotations

import html
import time
from typing import Any

import ipywidgets as W
import numpy as np

from toolkit.stages.clean import explore

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"]
ISSUES = ["label issue", "outlier", "duplicate", "no issue"]


class EmbeddingMap(W.VBox):
    """The map panel of a `CleanerWidget` (`owner`): colour toggle, figure, selection count and bulk buttons."""

    def __init__(self, owner: Any):
        import bqplot as bq

        self.owner = owner
        start = time.perf_counter()
        self.coords = explore.project_2d(owner.rankings.embeddings, seed=owner.spec.seed)
        owner.timings["projection_s"] = time.perf_counter() - start
        self.drawn = explore.sample_points(len(self.coords), seed=owner.spec.seed)
        rel = owner.raw.rel
        rows = owner.by_file
        self.given = [owner.raw.labels[i] for i in range(len(rel))]
        self.predicted = [rows.get(f, {}).get("predicted", "?") for f in rel]
        flagged_outliers = {r["file"] for r in owner.rankings.outliers if r.get("outlier")}
        in_groups = {f for g in owner.rankings.duplicates for f in g["files"]}
        self.issue = [ISSUES[0] if rows.get(f, {}).get("issue") else ISSUES[1] if f in flagged_outliers
                      else ISSUES[2] if f in in_groups else ISSUES[3] for f in rel]
        self.x_scale, self.y_scale = bq.LinearScale(), bq.LinearScale()
        self.color_by = W.ToggleButtons(options=["given", "predicted", "issue"], value="given",
                                        style={"button_width": "84px"}, layout=W.Layout(width="auto"))
        self.color_by.add_class("clean-map-color")
        self.color_by.observe(lambda _c: self._draw(), names="value")
        self.brush = bq.interacts.BrushSelector(x_scale=self.x_scale, y_scale=self.y_scale, color="steelblue")
        self.brush.observe(self._brushed, names=["brushing"])
        self.figure = bq.Figure(marks=[], interaction=self.brush, animation_duration=0,
                                fig_margin={"top": 12, "bottom": 12, "left": 12, "right": 24},
                                legend_location="top-left", legend_text={"font-size": "10px"},
                                layout=W.Layout(width="440px", height="420px"))
        self.figure.add_class("clean-map-figure")
        self.count = W.HTML("")
        self.count.add_class("clean-map-count")
        clear = W.Button(description="show all", layout=W.Layout(width="90px", flex="0 0 auto"))
        clear.add_class("clean-map-clear")
        clear.on_click(lambda _b: self.select(None))
        self.relabel_to = W.Dropdown(options=owner.classes, layout=W.Layout(width="100px", flex="0 0 auto"))
        buttons: list[W.Widget] = [clear]
        for action, text in (("keep", "keep all"), ("delete", "delete all"), ("relabel", "relabel to")):
            button = W.Button(description=text, layout=W.Layout(width="84px", flex="0 0 auto"),
                              button_style="danger" if action == "delete" else "")
            button.add_class(f"clean-sel-{action}")
            button.on_click(lambda _b, a=action: self.bulk(a))
            buttons.append(button)
        title = W.HTML(f"<b>embedding map</b> (PCA of {len(self.coords)} images, {len(self.drawn)} drawn): "
                       "drag a box to pick images")
        selection = W.HBox([*buttons[1:], self.relabel_to], layout=W.Layout(gap="4px"))
        super().__init__([title, self.color_by, self.figure, W.HBox([self.count, clear]), selection],
                         layout=W.Layout(width="460px", min_width="460px", flex="0 0 460px"))
        self.add_class("clean-map")
        self.picked: np.ndarray | None = None
        self._draw()
        self._count()

    def _draw(self) -> None:
        import bqplot as bq

        values = {"given": self.given, "predicted": self.predicted, "issue": self.issue}[self.color_by.value]
        cats = ISSUES if self.color_by.value == "issue" else sorted(set(self.given) | set(self.predicted))
        marks = []
        drawn_values = np.array([values[i] for i in self.drawn], dtype=object)
        for j, cat in enumerate(cats):
            idx = self.drawn[drawn_values == cat]
            if not len(idx):
                continue
            marks.append(bq.Scatter(x=self.coords[idx, 0], y=self.coords[idx, 1], scales={
                "x": self.x_scale, "y": self.y_scale}, colors=[PALETTE[j % len(PALETTE)]], default_size=10,
                stroke_width=0, labels=[cat], display_legend=True, opacities=[0.8]))
        self.figure.marks = marks
        self.brush.marks = marks

    def _brushed(self, change: dict[str, Any]) -> None:
        if change["new"]:
            return
        x, y = self.brush.selected_x, self.brush.selected_y
        if x is None or y is None or len(x) < 2 or len(y) < 2:
            return
        self.select_box(x, y)

    def select_box(self, x, y) -> None:
        """Pick every image (drawn or not) whose coordinates fall in the box; the grid shows them."""
        try:
            self.select(explore.in_box(self.coords, x, y))
        except Exception as exc:  # noqa: BLE001 - shown (Voilà would swallow it)
            self.owner.error.value = f"<pre class='clean-error-text'>error: {html.escape(str(exc))}</pre>"

    def select(self, indices: np.ndarray | None) -> None:
        self.picked = None if indices is None else np.asarray(indices, dtype=int)
        rel = self.owner.raw.rel
        self.owner.set_selection(None if self.picked is None else {rel[i] for i in self.picked})
        self._count()

    def _count(self) -> None:
        if self.picked is None:
            self.count.value = "<span class='clean-map-n'>no box: the grid shows every image</span>"
        else:
            self.count.value = (f"<span class='clean-map-n'>{len(self.picked)} images picked</span>: "
                                "the grid shows only them")

    def bulk(self, action: str) -> None:
        if self.picked is None or not len(self.picked):
            self.owner.status.value = "pick images on the map first (drag a box)"
            return
        rel = self.owner.raw.rel
        label = self.relabel_to.value if action == "relabel" else None
        n = self.owner.bulk_files([rel[i] for i in self.picked], action, label)
        self.owner.status.value = f"{action} recorded for {n} picked image(s)"
