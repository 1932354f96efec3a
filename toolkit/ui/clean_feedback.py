"""The cleaning app's feedback tab: images dashboard users sent (feedback/NAME) with the label they
gave; accept imports one into scrape/NAME/<label>/ (`toolkit.stages.feedback.import_feedback`: a new
raw file, a manifest line with its provenance, a decision), reject records that; "more like this"
ranks the raw images by similarity to it. The logic lives in the stage; this is the face."""

from __future__ import annotations

import html
import io
from typing import Any

import ipywidgets as W

from toolkit.ui.clean_safe import _safe

SHOWN = 48  # feedback items listed (pending first)


class FeedbackPanel(W.VBox):
    """Feedback items of `owner.spec` as cards: thumbnail, the user's label, the model's, accept / reject."""

    def __init__(self, owner: Any):
        self.owner = owner
        self.message = W.HTML("")
        self.message.add_class("clean-fb-status")
        self.list = W.Box(layout=W.Layout(display="flex", flex_flow="row wrap", gap="6px"))
        super().__init__([self.message, self.list])
        self.add_class("clean-feedback")
        self.n_pending = 0
        self.refresh()

    def refresh(self) -> None:
        from toolkit.stages.feedback import feedback_status

        items = feedback_status(self.owner.spec, self.owner.decisions)
        self.n_pending = sum(i["status"] == "pending" for i in items)
        items.sort(key=lambda i: (i["status"] != "pending", str(i.get("time", ""))))
        old = self.list.children
        self.list.children = [self._card(i, item) for i, item in enumerate(items[:SHOWN])] or [
            W.HTML(f"<i class='clean-fb-empty'>no feedback yet in {html.escape(str(self.owner.spec.feedback_dir))}"
                   "</i>")]
        for card in old:
            card.close()
        if hasattr(self.owner, "tabs"):
            self.owner.tabs.titles = ("review", f"feedback ({self.n_pending})")

    def _thumb(self, item: dict[str, Any]) -> bytes:
        from PIL import Image

        from toolkit.core.images import open_image

        try:
            img = open_image(self.owner.spec.feedback_dir / item["file"], draft_size=160)
            img.thumbnail((160, 160))
        except Exception:  # noqa: BLE001 - a broken file still gets a card
            img = Image.new("RGB", (160, 160), (200, 200, 200))
        buffer = io.BytesIO()
        img.convert("RGB").save(buffer, format="JPEG", quality=80)
        return buffer.getvalue()

    def _card(self, index: int, item: dict[str, Any]) -> W.Widget:
        label = str(item.get("label", ""))
        said = f"model said {html.escape(str(item.get('predicted')))} ({item.get('probability') or 0:.2f})" \
            if item.get("predicted") else "no model prediction"
        caption = W.HTML("<div style='font-size:11px;line-height:1.2;overflow-wrap:anywhere'>"
                         f"<b>{html.escape(item['file'])}</b><br>"
                         f"user's label: <b>{html.escape(label)}</b><br>{said}<br>{html.escape(str(item.get('time')))}"
                         f"<br>status: <span class='clean-fb-state'>{item['status']}</span></div>")
        options = list(dict.fromkeys([label, *self.owner.classes]))
        target = W.Dropdown(options=options, value=label, layout=W.Layout(width="150px"))
        target.add_class("clean-fb-label")
        accept = W.Button(description="accept", button_style="success", layout=W.Layout(width="72px"))
        accept.add_class("clean-fb-accept")
        reject = W.Button(description="reject", layout=W.Layout(width="72px"))
        reject.add_class("clean-fb-reject")
        similar = W.Button(description="more like this", layout=W.Layout(width="150px"))
        similar.add_class("clean-fb-similar")
        accept.on_click(lambda _b: self.accept(item, target.value))
        reject.on_click(lambda _b: self.reject(item))
        similar.on_click(lambda _b: self.similar(item))
        done = item["status"] != "pending"
        accept.disabled = reject.disabled = done
        card = W.VBox([W.Image(value=self._thumb(item), format="jpeg", layout=W.Layout(
            width="140px", height="140px", object_fit="contain")), caption, target, W.HBox([accept, reject]), similar],
            layout=W.Layout(border="1px solid #ccc", padding="4px", width="164px"))
        card.add_class("clean-fb-item")
        card.add_class(f"clean-fb-item-{index}")
        card.add_class(f"clean-fb-{item['status']}")
        return card

    @_safe
    def accept(self, item: dict[str, Any], label: str) -> None:
        from toolkit.stages.feedback import import_feedback

        result = import_feedback(self.owner.spec, item, label=label, log=self.owner.decisions)
        self.message.value = (f"<span class='clean-fb-imported'>imported</span> {html.escape(item['file'])} as "
                              f"scrape/{html.escape(self.owner.spec.name)}/{html.escape(result['file'])}"
                              + ("" if result["new"] else " (already there)") + "; it is ranked on the next visit")
        self.refresh()

    @_safe
    def reject(self, item: dict[str, Any]) -> None:
        from toolkit.stages.feedback import reject_feedback

        reject_feedback(self.owner.spec, item, log=self.owner.decisions)
        self.message.value = f"rejected {html.escape(item['file'])} (it stays in feedback/, nothing imported)"
        self.refresh()

    @_safe
    def similar(self, item: dict[str, Any]) -> None:
        from toolkit.stages.clean.embeddings import DEFAULT_SIZE, compute_embeddings

        spec = self.owner.spec
        emb, _, _ = compute_embeddings([spec.feedback_dir / item["file"]], arch=spec.arch,
                                       size=self.owner.size or DEFAULT_SIZE, cache_dir=spec.cleaned_dir / ".cache")
        self.owner.show_similar(vector=emb[0], title=f"feedback {item['file']}")
