"""The cleaning widget (ipywidgets 8): rankings in a paged grid, decisions recorded as you click.

Every choice is appended to cleaned_data/NAME/decisions.jsonl at once, and every tile reads its
state back from that file, so choices survive switching class, split or view, a new widget and a
kernel restart. Exceptions in callbacks are caught and shown (Voilà would swallow them).
Stable CSS classes (`clean-*`) let browser tests find the controls.

Instant paint: without given rankings the widget shows its header and a progress bar at once and
ranks in a background thread (ipywidgets updates from a thread reach the page while the kernel
runs); the grid, the map and the feedback tab appear when the rankings are ready. Keyboard-first
review with ipyevents (click or arrow keys select; k keep, d delete, 1-9 relabel, u undo, Enter next
page; double-click for a larger view). Map: `toolkit.ui.clean_map`; feedback: `toolkit.ui.clean_feedback`.
"""

from __future__ import annotations

import html
import io
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import ipywidgets as W

from toolkit.settings import ClassifierSpec
from toolkit.stages.clean.decisions import DecisionLog, apply_decisions, dry_run, pending, read_applied
from toolkit.stages.clean.rank import Rankings, RawImages
from toolkit.ui.clean_safe import _safe

VIEWS = {"label issues": "label_issues", "top losses": "top_losses", "duplicates": "duplicates",
         "outliers": "outliers", "label next": "label_next"}
LABEL_NEXT = 48  # images in the "label next" view (uncertain and spread out)
SIMILAR_K = 60  # images "more like this" shows
STYLE = """<style>
.clean-selected { box-shadow: inset 0 0 0 4px #1a73e8, 0 0 6px 2px rgba(26,115,232,.6); }
.clean-grid:focus { outline: 1px dashed #1a73e8; }
.clean-fb-item .widget-html-content { overflow-wrap: anywhere; }
.clean-tile img { cursor: pointer; }
.clean-legend { font-size: 12px; color: #333; background: #f4f6f8; padding: 4px 8px; border-radius: 4px; }
.clean-legend kbd { border: 1px solid #999; border-radius: 3px; padding: 0 4px; background: #fff; font-size: 11px; }
</style>"""
SPLITS = ("all", "train", "valid")
ALL_CLASSES = "(all classes)"
NO_DECISION = "—"


class Tile(W.VBox):
    """One image: thumbnail (click selects, double-click enlarges), given / predicted / probability /
    score, its decision control and "more like this"."""

    def __init__(self, owner: CleanerWidget, row: dict[str, Any], index: int, keep_one: bool = False):
        from ipyevents import Event

        self.owner, self.file, self.row, self.index = owner, row["file"], row, index
        given = row.get("given") or row.get("label", "")
        options = [NO_DECISION, "keep", "delete"] + [f"relabel to {c}" for c in owner.classes if c != given]
        self.decision = W.Dropdown(options=options, value=NO_DECISION, layout=W.Layout(width="150px"))
        self.decision.add_class("clean-decision")
        facts = [f"<b>{html.escape(self.file.rsplit('/', 1)[-1])}</b>", f"given: {html.escape(given)}"]
        if row.get("predicted"):
            facts.append(f"predicted: {html.escape(row['predicted'])} ({row.get('prob', 0):.2f})")
        if "similarity" in row:
            facts.append(f"similarity: {row['similarity']:.3f}")
        elif "score" in row:
            facts.append(f"score: {row['score']:.3f}" + (f", loss {row['loss']:.2f}" if "loss" in row else ""))
        facts.append(f"split: {row.get('split', '')}")
        self.caption = W.HTML("<div style='font-size:11px;line-height:1.2'>" + "<br>".join(facts) + "</div>")
        self.image = W.Image(value=owner.thumbnail(self.file), format="jpeg",
                             layout=W.Layout(width="140px", height="140px", object_fit="contain"))
        self.image.add_class("clean-thumb")
        self.events = Event(source=self.image, watched_events=["click", "dblclick"])
        self.events.on_dom_event(self._clicked)
        self.similar = W.Button(description="more like this", layout=W.Layout(width="150px"))
        self.similar.add_class("clean-similar")
        self.similar.on_click(lambda _b: owner.show_similar(self.file))
        children = [self.image, self.caption, self.decision, self.similar]
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

    def _clicked(self, event: dict[str, Any]) -> None:
        self.owner.select(self.index)
        if event.get("type") == "dblclick":
            self.owner.show_preview(self.file)

    def dispose(self) -> None:
        """Close this tile's widgets (a page turn would otherwise leave them alive in the kernel)."""
        for widget in (self.events, *self.children):
            widget.close()
        self.close()

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
    """`CleanerWidget(spec)`: pick class, split and view; mark keep / delete / relabel; apply.

    Without `rankings` it paints at once and ranks in a background thread (`wait()` joins it);
    `background=False` ranks before returning."""

    def __init__(self, spec: ClassifierSpec, data: Path | None = None, *, page_size: int = 12,
                 rankings: Rankings | None = None, raw: RawImages | None = None, size: int | None = None,
                 background: bool = True):
        self.spec, self.page_size, self._rendering = spec, page_size, False
        self.data, self.size = data, size
        self.decisions = DecisionLog(spec.cleaned_dir)
        self.state: dict[str, dict[str, Any]] = {}
        self._thumbs: dict[str, bytes] = {}
        self.tiles: list[Tile] = []
        self.page = 0
        self.selected: int | None = None
        self.selection: set[str] | None = None  # files picked on the map (None: no filter)
        self.query: dict[str, Any] | None = None  # "more like this": {"title", "rows"}
        self.classes: list[str] = []
        self.ready = threading.Event()
        self.timings: dict[str, float] = {"created": time.time()}
        self.error = W.HTML("")
        self.error.add_class("clean-error")
        self.status = W.HTML("")
        self.status.add_class("clean-status")
        self.progress_bar = W.FloatProgress(value=0.0, min=0.0, max=1.0, layout=W.Layout(width="420px"))
        self.progress_text = W.HTML("<span class='clean-progress-text'>0% starting</span>")
        self.progress = W.HBox([self.progress_bar, self.progress_text])
        self.progress.add_class("clean-progress")
        self._last_progress = -1.0
        title = W.HTML(f"{STYLE}<h2>Clean {html.escape(spec.display_title)}</h2>")
        super().__init__([title, self.error, self.status, self.progress])
        self.add_class("clean-widget")
        self.raw, self.rankings = raw, rankings
        if rankings is not None or not background:
            self._load()
        else:
            self._thread = threading.Thread(target=self._load, name="clean-rank", daemon=True)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the rankings (True when the grid is built)."""
        return self.ready.wait(timeout)

    def on_progress(self, fraction: float, message: str) -> None:
        """rank()'s progress: a percentage and what it is doing (throttled to whole percents)."""
        if fraction < 1.0 and fraction - self._last_progress < 0.01:
            return
        self._last_progress = fraction
        self.progress_bar.value = max(0.0, min(1.0, fraction))
        self.progress_text.value = (f"<span class='clean-progress-text'>{100 * fraction:.0f}% "
                                    f"{html.escape(message)}</span>")

    def _load(self) -> None:
        try:
            if self.raw is None:
                from toolkit.stages.clean.rank import list_raw_images

                self.on_progress(0.0, "listing and verifying images")
                self.raw = list_raw_images(self.spec, self.data)
            if self.rankings is None:
                from toolkit.stages.clean.rank import rank

                kwargs = {"size": self.size} if self.size else {}
                self.rankings = rank(self.spec, self.data, raw=self.raw, on_progress=self.on_progress, **kwargs)
            self.timings["ranked"] = time.time()
            self.classes = self.rankings.classes
            self.files = dict(zip(self.raw.rel, self.raw.files, strict=True))
            self.index_of = {f: i for i, f in enumerate(self.raw.rel)}
            self.by_file = {r["file"]: r for r in self.rankings.label_issues}
            self._build()
            self.render()
            self.on_progress(1.0, f"ready: {len(self.raw.files)} images")
            self.progress.layout.display = "none"
            self.timings["tiles"] = time.time()
        except Exception as exc:  # noqa: BLE001 - shown, not raised, inside Voilà (or a thread)
            self.error.value = (f"<pre class='clean-error-text'>error: {html.escape(str(exc))}\n"
                                f"{html.escape(traceback.format_exc(limit=4))}</pre>")
        finally:
            self.ready.set()

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
        self.retrain_button = W.Button(description="retrain head", tooltip="retrain the model's head on the "
                                       "cleaned data (apply first); seconds, on cached body features")
        self.retrain_button.add_class("clean-retrain")
        self.retrain_button.on_click(lambda _b: self.retrain())
        self.summary = W.HTML("")
        self.summary.add_class("clean-summary")
        self.grid = W.Box(layout=W.Layout(display="flex", flex_flow="row wrap", gap="6px"))
        self.grid.add_class("clean-grid")
        from ipyevents import Event

        self.key_events = Event(source=self.grid, watched_events=["keydown"], prevent_default_action=True,
                                ignore_modifier_key_events=True)
        self.key_events.on_dom_event(self._key)
        numbered = ", ".join(f"<kbd>{i + 1}</kbd> {html.escape(c)}" for i, c in enumerate(self.classes[:9]))
        self.legend = W.HTML(
            "<div class='clean-legend'>pointer over the grid: click or <kbd>&larr;</kbd><kbd>&rarr;</kbd>"
            "<kbd>&uarr;</kbd><kbd>&darr;</kbd> select &middot; <kbd>k</kbd> keep &middot; <kbd>d</kbd> delete "
            f"&middot; relabel to {numbered} &middot; <kbd>u</kbd> undo &middot; <kbd>Enter</kbd> next page "
            "&middot; double-click: larger view</div>")
        self.query_label = W.HTML("")
        self.query_label.add_class("clean-query")
        self.query_clear = W.Button(description="back to the view", layout=W.Layout(width="140px"))
        self.query_clear.add_class("clean-query-clear")
        self.query_clear.on_click(lambda _b: self.clear_query())
        self.query_box = W.HBox([self.query_label, self.query_clear], layout=W.Layout(display="none"))
        self.preview_image = W.Image(format="jpeg", layout=W.Layout(max_width="480px", max_height="480px",
                                                                   object_fit="contain"))
        self.preview_caption = W.HTML("")
        close = W.Button(description="close", layout=W.Layout(width="80px"))
        close.on_click(lambda _b: setattr(self.preview.layout, "display", "none"))
        self.preview = W.VBox([self.preview_caption, self.preview_image, close],
                              layout=W.Layout(display="none", border="2px solid #1a73e8", padding="6px"))
        self.preview.add_class("clean-preview")
        review = W.VBox([
            self.legend, W.HBox([self.class_select, self.view_select]), self.split_select, self.query_box,
            W.HBox([self.prev_button, self.page_label, self.next_button]),
            self.grid, self.preview,
            W.HBox([self.bulk_keep, self.bulk_delete, self.bulk_relabel, self.bulk_relabel_to]),
            W.HBox([self.undo_button, self.undo_all_button, self.diff_button, self.apply_button,
                    self.retrain_button]), self.summary,
        ], layout=W.Layout(flex="1 1 auto", min_width="520px"))
        panels: list[W.Widget] = [review]
        self.map = None
        if self.rankings.embeddings is not None and len(self.raw.files):
            from toolkit.ui.clean_map import EmbeddingMap

            self.map = EmbeddingMap(self)
            panels.append(self.map)
        from toolkit.ui.clean_feedback import FeedbackPanel

        self.feedback = FeedbackPanel(self)
        self.tabs = W.Tab([W.HBox(panels, layout=W.Layout(align_items="flex-start", gap="12px")), self.feedback])
        self.tabs.titles = ("review", f"feedback ({self.feedback.n_pending})")
        self.tabs.add_class("clean-tabs")
        self.children = [*self.children, self.tabs]

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
        view = self.view
        klass, split = self.class_select.value, self.split_select.value
        if self.query is not None:
            rows = self.query["rows"]
        elif view == "label_next":
            rows = self._label_next()
        else:
            rows = getattr(self.rankings, view)
        picked = self.selection
        if view == "duplicates" and self.query is None:
            return [g for g in rows if (klass == ALL_CLASSES or klass in g["labels"])
                    and (split == "all" or split in g["splits"]) and (picked is None or picked & set(g["files"]))]
        return [r for r in rows if (klass == ALL_CLASSES or r["given"] == klass)
                and (split == "all" or r.get("split") == split) and (picked is None or r["file"] in picked)]

    @property
    def view(self) -> str:
        return "label_issues" if self.query is not None else VIEWS[self.view_select.value]

    def _label_next(self) -> list[dict[str, Any]]:
        """Uncertain (low out-of-fold top probability) and spread out (farthest points on the embeddings)."""
        if getattr(self, "_next_rows", None) is None:
            from toolkit.stages.clean.explore import farthest_points

            rows = [r for r in self.rankings.label_issues if r["file"] in self.index_of]
            pool = sorted(rows, key=lambda r: r["prob"])[:500]
            emb = self.rankings.embeddings
            if emb is None or not pool:
                self._next_rows = pool[:LABEL_NEXT]
            else:
                idx = [self.index_of[r["file"]] for r in pool]
                chosen = farthest_points(emb, idx, LABEL_NEXT, weights=[1.0 - r["prob"] for r in pool])
                self._next_rows = [self.by_file[self.raw.rel[i]] for i in chosen]
        return self._next_rows

    @property
    def n_pages(self) -> int:
        return max(1, -(-len(self.rows()) // self.page_size))

    # ------------------------------------------------------------ rendering

    @_safe
    def _filters_changed(self, change=None) -> None:
        if change is not None and change.get("owner") is self.view_select and self.query is not None:
            self.query = None
            self.query_box.layout.display = "none"
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
        view = self.view
        old = self.tiles
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
        for tile in old:
            tile.dispose()
        self.selected = None
        if self.tiles:
            self.select(0)
        unit = "groups" if view == "duplicates" else "images"
        if self.selection is not None:
            unit += f", filtered to the {len(self.selection)} picked on the map"
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

    # ------------------------------------------------------------ keyboard, selection, similar, preview

    def select(self, index: int) -> None:
        """Select the index-th tile of the page (the outline shows it; keys act on it)."""
        if not self.tiles:
            return
        index = max(0, min(index, len(self.tiles) - 1))
        if self.selected is not None and self.selected < len(self.tiles):
            self.tiles[self.selected].remove_class("clean-selected")
        self.selected = index
        self.tiles[index].add_class("clean-selected")

    @_safe
    def _key(self, event: dict[str, Any]) -> None:
        self.press(str(event.get("key", "")))

    def press(self, key: str) -> None:
        """One key of the legend, as the browser sends it (`ArrowRight`, `k`, `3`, `Enter`, ...)."""
        columns = max(1, getattr(self, "columns", 6))
        if key == "Enter":
            self.go(self.page + 1)
            return
        if key == "u":
            self.undo()
            return
        if not self.tiles:
            return
        at = self.selected or 0
        moves = {"ArrowRight": 1, "ArrowLeft": -1, "ArrowDown": columns, "ArrowUp": -columns}
        if key in moves:
            self.select(at + moves[key])
            return
        tile = self.tiles[at]
        given = tile.row.get("given")
        if key in ("k", "d"):
            self.decide(tile.file, "keep" if key == "k" else "delete", reason=f"widget key {key}: {self.view}")
        elif key.isdigit() and key != "0":
            n = int(key)
            if n > len(self.classes):
                self.status.value = f"no class {n}: there are {len(self.classes)}"
                return
            label = self.classes[n - 1]
            if label == given:
                self.status.value = f"{html.escape(tile.file)} is already {html.escape(label)}"
                return
            self.decide(tile.file, f"relabel to {label}", reason=f"widget key {key}: {self.view}")
        else:
            return
        self.select(at + 1)

    @_safe
    def show_preview(self, file: str) -> None:
        """The larger view of one image (double-click)."""
        from toolkit.core.images import open_image

        img = open_image(self.files.get(file) or self.raw.root / file, draft_size=480)
        img.thumbnail((480, 480))
        buffer = io.BytesIO()
        img.convert("RGB").save(buffer, format="JPEG", quality=88)
        self.preview_image.value = buffer.getvalue()
        row = self.by_file.get(file, {})
        self.preview_caption.value = (f"<b>{html.escape(file)}</b> &middot; given {html.escape(row.get('given', ''))}"
                                      f" &middot; predicted {html.escape(row.get('predicted', ''))} "
                                      f"({row.get('prob', 0):.2f}) &middot; {img.width} x {img.height} shown")
        self.preview.layout.display = "flex"

    @_safe
    def show_similar(self, file: str | None = None, *, vector=None, title: str = "") -> None:
        """Rank the grid by cosine similarity to one raw image (or to an embedding `vector`)."""
        from toolkit.stages.clean.explore import similar

        emb = self.rankings.embeddings
        if emb is None:
            raise RuntimeError("no embeddings to compare with")
        if vector is None:
            idx, sims = similar(emb, self.index_of[file], SIMILAR_K)
            title = title or file
            rows = [{**self.by_file.get(file, {"file": file}), "similarity": 1.0}]
        else:
            idx, sims = similar(emb, vector=vector, k=SIMILAR_K)
            rows = []
        for i, sim in zip(idx.tolist(), sims.tolist(), strict=True):
            rel = self.raw.rel[i]
            rows.append({**self.by_file.get(rel, {"file": rel, "given": self.raw.labels[i],
                                                  "split": self.raw.split_of(i)}), "similarity": float(sim)})
        self.query = {"title": title, "rows": rows}
        self.query_label.value = (f"<b>more like</b> <span class='clean-query-title'>{html.escape(title)}</span>: "
                                  f"the {len(rows)} most similar images (cosine on the embeddings)")
        self.query_box.layout.display = "flex"
        if hasattr(self, "tabs"):
            self.tabs.selected_index = 0
        self.page = 0
        self.render()

    @_safe
    def clear_query(self) -> None:
        self.query = None
        self.query_box.layout.display = "none"
        self.page = 0
        self.render()

    def set_selection(self, files: set[str] | None) -> None:
        """Filter the grid to these files (the map's box selection); None shows everything again."""
        self.selection = set(files) if files is not None else None
        self.page = 0
        self.render()

    @_safe
    def bulk_files(self, files: list[str], action: str, label: str | None = None) -> int:
        """One decision for each file (one append): the map selection's keep / delete / relabel."""
        given = {f: self.by_file.get(f, {}).get("given") for f in files}
        files = [f for f in files if not (action == "relabel" and given[f] == label)]
        self.decisions.record_many(files, action, label, reason=f"widget map selection ({len(files)})",
                                   source="widget")
        self._refresh_tiles()
        return len(files)

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

    def retrain(self, *, background: bool = True) -> threading.Thread | None:
        """The "retrain head" button: `toolkit.stages.train.retrain_head` on the cleaned data in a
        background thread (the status line shows the new accuracy beside the old one)."""
        self.retrain_button.disabled = True
        self.status.value = "retraining the head on the cleaned data..."
        if not background:
            self._retrain()
            return None
        thread = threading.Thread(target=self._retrain, name="clean-retrain", daemon=True)
        thread.start()
        return thread

    @_safe
    def _retrain(self) -> None:
        from toolkit.stages.train import retrain_head

        try:
            lines: list[str] = []
            metrics = retrain_head(self.spec, progress=False, log=lines.append)
        finally:
            self.retrain_button.disabled = False
        previous = metrics.get("previous_accuracy")
        was = f" (was {previous:.1%})" if isinstance(previous, (int, float)) else ""
        self.status.value = (f"<span class='clean-retrained'>retrained</span>: validation accuracy "
                             f"{metrics['accuracy']:.1%}{was}; {metrics['features_computed']} images through the "
                             f"body, {metrics['features_reused']} from the cache; dashboards load it on their next "
                             "kernel")
