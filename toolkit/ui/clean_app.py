"""The cleaning widget (ipywidgets 8): rankings in a paged grid, decisions recorded as you click.

Every choice is appended to cleaned_data/NAME/decisions.jsonl at once, and every tile reads its
state back from that file, so choices survive switching class, split or view, a new widget and a
kernel restart. Exceptions in callbacks are caught and shown (Voilà would swallow them).
Stable CSS classes (`clean-*`) let browser tests find the controls.
"""

from __future__ import annotations

import html
import io
import traceback
from functools import wraps
from pathlib import Path
from typing import Any

import ipywidgets as W

from toolkit.settings import ClassifierSpec
from toolkit.stages.clean.decisions import DecisionLog, apply_decisions, dry_run, pending, read_applied
from toolkit.stages.clean.rank import Rankings, RawImages, list_raw_images, rank

VIEWS = {"label issues": "label_issues", "top losses": "top_losses", "duplicates": "duplicates",
         "outliers": "outliers"}
SPLITS = ("all", "train", "valid")
ALL_CLASSES = "(all classes)"
NO_DECISION = "—"


def _safe(method):
    """Run a callback; show any exception in the widget's error box instead of losing it."""

    @wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            self.error.value = ""
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self.error.value = (f"<pre class='clean-error-text'>error: {html.escape(str(exc))}\n"
                                f"{html.escape(traceback.format_exc(limit=4))}</pre>")
            return None

    return wrapper


class Tile(W.VBox):
    """One image: thumbnail, given / predicted / probability / score, and its decision control."""

    def __init__(self, owner: CleanerWidget, row: dict[str, Any], index: int, keep_one: bool = False):
        self.owner, self.file, self.row = owner, row["file"], row
        given = row.get("given") or row.get("label", "")
        options = [NO_DECISION, "keep", "delete"] + [f"relabel to {c}" for c in owner.classes if c != given]
        self.decision = W.Dropdown(options=options, value=NO_DECISION, layout=W.Layout(width="150px"))
        self.decision.add_class("clean-decision")
        facts = [f"<b>{html.escape(self.file.rsplit('/', 1)[-1])}</b>", f"given: {html.escape(given)}"]
        if row.get("predicted"):
            facts.append(f"predicted: {html.escape(row['predicted'])} ({row.get('prob', 0):.2f})")
        if "score" in row:
            facts.append(f"score: {row['score']:.3f}" + (f", loss {row['loss']:.2f}" if "loss" in row else ""))
        facts.append(f"split: {row.get('split', '')}")
        caption = W.HTML("<div style='font-size:11px;line-height:1.2'>" + "<br>".join(facts) + "</div>")
        children = [W.Image(value=owner.thumbnail(self.file), format="jpeg",
                            layout=W.Layout(width="140px", height="140px", object_fit="contain")),
                    caption, self.decision]
        if keep_one:
            button = W.Button(description="keep only this", layout=W.Layout(width="150px"))
            button.add_class("clean-keep-one")
            button.on_click(lambda _b: owner.keep_one(self))
            children.append(button)
        super().__init__(children, layout=W.Layout(border="1px solid #ccc", padding="4px", width="164px"))
        self.add_class("clean-tile")
        self.add_class(f"clean-tile-{index}")
        self.refresh()
        self.decision.observe(self._changed, names="value")

    def refresh(self) -> None:
        decision = self.owner.state.get(self.file)
        value = NO_DECISION
        if decision:
            value = f"relabel to {decision['label']}" if decision["action"] == "relabel" else decision["action"]
        self.owner._rendering = True
        try:
            if value in self.decision.options:
                self.decision.value = value
        finally:
            self.owner._rendering = False
        for name in ("keep", "delete", "relabel"):
            self.remove_class(f"clean-marked-{name}")
        if decision:
            self.add_class(f"clean-marked-{decision['action']}")
        self.layout.border = {"delete": "3px solid #d33", "relabel": "3px solid #d80",
                              "keep": "3px solid #3a3"}.get(decision["action"] if decision else "", "1px solid #ccc")

    def _changed(self, change) -> None:
        if not self.owner._rendering:
            self.owner.decide(self.file, change["new"])


class CleanerWidget(W.VBox):
    """`CleanerWidget(spec)`: pick class, split and view; mark keep / delete / relabel; apply."""

    def __init__(self, spec: ClassifierSpec, data: Path | None = None, *, page_size: int = 12,
                 rankings: Rankings | None = None, raw: RawImages | None = None, size: int | None = None):
        self.spec, self.page_size, self._rendering = spec, page_size, False
        self.decisions = DecisionLog(spec.cleaned_dir)
        self.state: dict[str, dict[str, Any]] = {}
        self._thumbs: dict[str, bytes] = {}
        self.tiles: list[Tile] = []
        self.page = 0
        self.error = W.HTML("")
        self.error.add_class("clean-error")
        self.status = W.HTML("")
        self.status.add_class("clean-status")
        title = W.HTML(f"<h2>Clean {html.escape(spec.display_title)}</h2>")
        super().__init__([title, self.error, self.status])
        self.add_class("clean-widget")
        self.raw, self.rankings = raw, rankings
        try:
            if self.raw is None:
                self.raw = list_raw_images(spec, data)
            if self.rankings is None:
                kwargs = {"size": size} if size else {}
                self.rankings = rank(spec, data, raw=self.raw, **kwargs)
        except Exception as exc:  # noqa: BLE001 - shown, not raised, inside Voilà
            self.error.value = f"<pre class='clean-error-text'>error: {html.escape(str(exc))}</pre>"
            return
        self.classes = self.rankings.classes
        self.files = dict(zip(self.raw.rel, self.raw.files, strict=True))
        self._build()
        self.render()

    # ------------------------------------------------------------ layout

    def _build(self) -> None:
        self.class_select = W.Dropdown(options=[ALL_CLASSES, *self.classes], value=ALL_CLASSES, description="class")
        self.class_select.add_class("clean-class")
        self.split_select = W.ToggleButtons(options=list(SPLITS), value="all", description="split")
        self.split_select.add_class("clean-split")
        self.view_select = W.Dropdown(options=list(VIEWS), value="label issues", description="view")
        self.view_select.add_class("clean-view")
        for control in (self.class_select, self.split_select, self.view_select):
            control.observe(self._filters_changed, names="value")
        self.prev_button = W.Button(description="◀ previous", layout=W.Layout(width="110px"))
        self.next_button = W.Button(description="next ▶", layout=W.Layout(width="110px"))
        self.prev_button.add_class("clean-prev")
        self.next_button.add_class("clean-next")
        self.prev_button.on_click(lambda _b: self.go(self.page - 1))
        self.next_button.on_click(lambda _b: self.go(self.page + 1))
        self.page_label = W.HTML("")
        self.page_label.add_class("clean-page")
        self.bulk_keep = W.Button(description="keep page")
        self.bulk_delete = W.Button(description="delete page", button_style="danger")
        self.bulk_relabel_to = W.Dropdown(options=self.classes, layout=W.Layout(width="140px"))
        self.bulk_relabel = W.Button(description="relabel page to")
        for button, css, action in ((self.bulk_keep, "clean-bulk-keep", "keep"),
                                    (self.bulk_delete, "clean-bulk-delete", "delete"),
                                    (self.bulk_relabel, "clean-bulk-relabel", "relabel")):
            button.add_class(css)
            button.on_click(lambda _b, a=action: self.bulk(a))
        self.undo_button = W.Button(description="undo last")
        self.undo_button.add_class("clean-undo")
        self.undo_button.on_click(lambda _b: self.undo())
        self.undo_all_button = W.Button(description="undo all mine")
        self.undo_all_button.add_class("clean-undo-all")
        self.undo_all_button.on_click(lambda _b: self.undo_all())
        self.diff_button = W.Button(description="preview apply")
        self.diff_button.add_class("clean-dry-run")
        self.diff_button.on_click(lambda _b: self.preview())
        self.apply_button = W.Button(description="apply", button_style="success")
        self.apply_button.add_class("clean-apply")
        self.apply_button.on_click(lambda _b: self.apply())
        self.summary = W.HTML("")
        self.summary.add_class("clean-summary")
        self.grid = W.Box(layout=W.Layout(display="flex", flex_flow="row wrap", gap="6px"))
        self.grid.add_class("clean-grid")
        self.children = [
            *self.children,
            W.HBox([self.class_select, self.view_select]), self.split_select,
            W.HBox([self.prev_button, self.page_label, self.next_button]),
            self.grid,
            W.HBox([self.bulk_keep, self.bulk_delete, self.bulk_relabel, self.bulk_relabel_to]),
            W.HBox([self.undo_button, self.undo_all_button, self.diff_button, self.apply_button]), self.summary,
        ]

    # ------------------------------------------------------------ data

    def thumbnail(self, file: str) -> bytes:
        if file not in self._thumbs:
            from toolkit.core.images import open_image

            try:
                img = open_image(self.files.get(file) or self.raw.root / file, draft_size=160)
                img.thumbnail((160, 160))
            except Exception:  # noqa: BLE001 - a broken file still gets a tile
                from PIL import Image

                img = Image.new("RGB", (160, 160), (200, 200, 200))
            buffer = io.BytesIO()
            img.save(buffer, format="JPEG", quality=80)
            self._thumbs[file] = buffer.getvalue()
        return self._thumbs[file]

    def rows(self) -> list[dict[str, Any]]:
        """The current view's rows after the class and split filters (groups for duplicates)."""
        view = VIEWS[self.view_select.value]
        klass, split = self.class_select.value, self.split_select.value
        rows = getattr(self.rankings, view)
        if view == "duplicates":
            return [g for g in rows if (klass == ALL_CLASSES or klass in g["labels"])
                    and (split == "all" or split in g["splits"])]
        return [r for r in rows if (klass == ALL_CLASSES or r["given"] == klass)
                and (split == "all" or r.get("split") == split)]

    @property
    def n_pages(self) -> int:
        return max(1, -(-len(self.rows()) // self.page_size))

    # ------------------------------------------------------------ rendering

    @_safe
    def _filters_changed(self, _change=None) -> None:
        self.page = 0
        self.render()

    @_safe
    def go(self, page: int) -> None:
        self.page = max(0, min(page, self.n_pages - 1))
        self.render()

    def render(self) -> None:
        self.state = self.decisions.state()
        rows = self.rows()
        self.page = max(0, min(self.page, self.n_pages - 1))
        chunk = rows[self.page * self.page_size : (self.page + 1) * self.page_size]
        view = VIEWS[self.view_select.value]
        self.tiles = []
        children: list[W.Widget] = []
        if view == "duplicates":
            for g, group in enumerate(chunk):
                members = []
                for f, label, split in zip(group["files"], group["labels"], group["splits"], strict=True):
                    tile = Tile(self, {"file": f, "given": label, "split": split}, len(self.tiles), keep_one=True)
                    self.tiles.append(tile)
                    members.append(tile)
                tags = [group["kind"]] + (["across classes"] if group["cross_class"] else []) + (
                    ["train/valid leak"] if group["leak"] else [])
                box = W.VBox([W.HTML(f"<b>group {self.page * self.page_size + g + 1}</b>: {', '.join(tags)}"),
                              W.HBox(members)], layout=W.Layout(border="1px dashed #888", padding="4px"))
                box.add_class("clean-group")
                children.append(box)
        else:
            for row in chunk:
                tile = Tile(self, row, len(self.tiles))
                self.tiles.append(tile)
                children.append(tile)
        if not rows:
            message = "nothing to show for this class, split and view"
            if view == "top_losses" and not self.rankings.top_losses:
                message = (f"no trained model in {self.spec.models_dir}: run `toolkit train {self.spec.name}`, "
                           "or use the label issues view (it needs no training)")
            children = [W.HTML(f"<i class='clean-empty'>{html.escape(message)}</i>")]
        self.grid.children = children
        unit = "groups" if view == "duplicates" else "images"
        self.page_label.value = f"page {self.page + 1} of {self.n_pages} ({len(rows)} {unit})"
        self.prev_button.disabled = self.page == 0
        self.next_button.disabled = self.page >= self.n_pages - 1
        self._summarise()

    def _summarise(self) -> None:
        waiting = pending(self.decisions)
        counts: dict[str, int] = {}
        for d in waiting.values():
            counts[d["action"]] = counts.get(d["action"], 0) + 1
        applied = read_applied(self.spec.cleaned_dir)
        total: dict[str, int] = {}
        for d in self.state.values():
            total[d["action"]] = total.get(d["action"], 0) + 1
        parts = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none"
        decided = ", ".join(f"{v} {k}" for k, v in sorted(total.items())) or "none"
        last = f"last applied {applied['time']}" if applied.get("time") else "never applied"
        self.summary.value = (f"<div>decisions: {decided}. <b>pending</b>: <span class='clean-pending'>"
                              f"{len(waiting)}</span> ({parts}); {last}.</div>")

    def _refresh_tiles(self) -> None:
        self.state = self.decisions.state()
        for tile in self.tiles:
            tile.refresh()
        self._summarise()

    # ------------------------------------------------------------ decisions

    @_safe
    def decide(self, file: str, value: str, reason: str = "") -> None:
        """Record the choice for one file (value as in the tile's menu: keep, delete, 'relabel to X', —)."""
        reason = reason or f"widget: {self.view_select.value}"
        if value == NO_DECISION:
            self.decisions.clear(file)
        elif value.startswith("relabel to "):
            self.decisions.record(file, "relabel", value[len("relabel to "):], reason=reason, source="widget")
        else:
            self.decisions.record(file, value, reason=reason, source="widget")
        self._refresh_tiles()

    @_safe
    def bulk(self, action: str) -> None:
        label = self.bulk_relabel_to.value if action == "relabel" else None
        for tile in self.tiles:
            if action == "relabel" and tile.row.get("given") == label:
                continue
            self.decisions.record(tile.file, action, label, reason=f"widget bulk: {self.view_select.value}",
                            source="widget")
        self._refresh_tiles()

    @_safe
    def keep_one(self, chosen: Tile) -> None:
        group = next((g for g in self.rankings.duplicates if chosen.file in g["files"]), None)
        for file in group["files"] if group else [chosen.file]:
            self.decisions.record(file, "keep" if file == chosen.file else "delete",
                            reason=f"duplicate of {chosen.file}" if file != chosen.file else "kept one of duplicates",
                            source="widget")
        self._refresh_tiles()

    @_safe
    def undo(self) -> None:
        """Undo this widget's (this session's) last decision; other sessions' decisions stay."""
        undone = self.decisions.undo()
        self.status.value = f"undid {undone['action']} {html.escape(undone['file'])}" if undone else "nothing to undo"
        self._refresh_tiles()

    @_safe
    def undo_all(self) -> None:
        """Undo every decision of this widget's session."""
        n = self.decisions.undo_all()
        self.status.value = f"undid {n} decision(s) of this session"
        self._refresh_tiles()

    @_safe
    def preview(self) -> None:
        diff = dry_run(self.raw, self.decisions)
        self.status.value = (f"apply would add {len(diff['add'])}, remove {len(diff['remove'])} and move "
                             f"{len(diff['move'])} files in {html.escape(str(self.spec.cleaned_dir))}")

    @_safe
    def apply(self) -> dict[str, Any]:
        result = apply_decisions(self.raw, self.decisions)
        self.status.value = (f"<span class='clean-applied'>applied</span>: {result['kept']} images in "
                             f"{html.escape(result['folder'])} ({result['deleted']} deleted, "
                             f"{result['relabelled']} relabelled)"
                             + "".join(f"<br>refused: {html.escape(line)}" for line in result["refused"]))
        self._refresh_tiles()
        return result
