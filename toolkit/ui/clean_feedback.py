"""The cleaning app's feedback tab: images dashboard users sent (feedback/NAME) with the label they
gave, and unlabelled images (feedback/NAME/_unlabelled/); accept imports one into scrape/NAME/<label>/
(`toolkit.stages.feedback.import_feedback`: a new raw file, a manifest line with its provenance, a
decision) and adds it to the session's listing so that "apply" includes it; reject records that;
"more like this" ranks the raw images by similarity to it. "show: label next" orders the pending ones
by `toolkit.stages.feedback.label_next` (the current model's uncertainty, spread out on the
embeddings, away from the raw images). The logic lives in the stage; this is the face."""

from __future__ import annotations

import html
import io
from typing import Any

import ipywidgets as W

from toolkit.ui.clean_safe import _safe

SHOWN = 48  # feedback items listed (pending first)
LABEL_NEXT = "label next"
ORDERS = ("pending first", LABEL_NEXT)


class FeedbackPanel(W.VBox):
    """Feedback items of `owner.spec` as cards: thumbnail, the user's label, the model's, accept / reject."""

    def __init__(self, owner: Any):
        self.owner = owner
        self.message = W.HTML("")
        self.message.add_class("clean-fb-status")
        self.order = W.ToggleButtons(options=ORDERS, value=ORDERS[0], description="show",
                                     tooltips=["pending first, oldest first",
                                               "the most useful to label first: the current model's least sure, "
                                               "spread out (unlabelled images and pending feedback)"])
        self.order.add_class("clean-fb-order")
        self.order.observe(lambda _c: self.refresh(), names="value")
        self.list = W.Box(layout=W.Layout(display="flex", flex_flow="row wrap", gap="6px"))
        super().__init__([self.order, self.message, self.list])
        self.add_class("clean-feedback")
        self.n_pending = 0
        self.items: list[dict[str, Any]] = []
        self.refresh()

    def refresh(self) -> None:
        from toolkit.stages.feedback import feedback_status, unlabelled_items

        spec = self.owner.spec
        items = feedback_status(spec, self.owner.decisions) + unlabelled_items(spec, self.owner.decisions)
        self.n_pending = sum(i["status"] == "pending" for i in items)
        if self.order.value == LABEL_NEXT:
            items = self._label_next()
        else:
            items.sort(key=lambda i: (i["status"] != "pending", str(i.get("time", ""))))
        self.items = items[:SHOWN]
        old = self.list.children
        self.list.children = [self._card(i, item) for i, item in enumerate(self.items)] or [
            W.HTML(f"<i class='clean-fb-empty'>no feedback yet in {html.escape(str(self.owner.spec.feedback_dir))}"
                   "</i>")]
        for card in old:
            card.close()
        if hasattr(self.owner, "tabs"):
            self.owner.tabs.titles = ("review", f"feedback ({self.n_pending})")

    def _label_next(self) -> list[dict[str, Any]]:
        """`toolkit.stages.feedback.label_next`, away from the raw images' embeddings when the app has them."""
        from toolkit.stages.feedback import label_next

        rankings = getattr(self.owner, "rankings", None)
        reference = getattr(rankings, "embeddings", None)
        return label_next(self.owner.spec, log=self.owner.decisions, reference=reference,
                          size=getattr(self.owner, "size", None))

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
        label = item.get("label")
        said = f"model said {html.escape(str(item.get('predicted')))} ({item.get('probability') or 0:.2f})" \
            if item.get("predicted") else "no model prediction"
        given = f"user's label: <b>{html.escape(label)}</b>" if label else "<b>no label</b>"
        ranked = (f"<span class='clean-fb-rank'>#{item['rank']}</span> uncertainty {item['uncertainty']:.2f}, "
                  f"the model guesses <b>{html.escape(str(item.get('guess')))}</b><br>") if "rank" in item else ""
        caption = W.HTML("<div style='font-size:11px;line-height:1.2;overflow-wrap:anywhere'>"
                         f"{ranked}<b>{html.escape(item['file'])}</b><br>"
                         f"{given}<br>{said}<br>{html.escape(str(item.get('time')))}"
                         f"<br>status: <span class='clean-fb-state'>{item['status']}</span></div>")
        first = label or item.get("guess") or (self.owner.classes[0] if self.owner.classes else "")
        options = [o for o in dict.fromkeys([first, *self.owner.classes]) if o]
        target = W.Dropdown(options=options, value=first or None, layout=W.Layout(width="150px"))
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
        self._add_to_session(result)
        self.message.value = (f"<span class='clean-fb-imported'>imported</span> {html.escape(item['file'])} as "
                              f"scrape/{html.escape(self.owner.spec.name)}/{html.escape(result['file'])}"
                              + ("" if result["new"] else " (already there)") + "; it is ranked on the next visit")
        self.refresh()

    def _add_to_session(self, result: dict[str, Any]) -> None:
        """Make the imported raw file part of this session's listing, so that the app's "apply" (which
        builds cleaned_data/NAME from the listing made when the app opened) includes it. It goes at the
        end, so the rankings' and the map's row numbers stay valid; it is ranked on the next visit."""
        raw = getattr(self.owner, "raw", None)
        if raw is None or result["file"] in set(raw.rel):
            return
        path = raw.root / result["file"]
        raw.files.append(path)
        raw.labels.append(result["label"])
        raw.is_valid.append(False)  # a train image in this session; the next listing splits it by the rule
        if result["label"] not in raw.classes:
            raw.classes.append(result["label"])
        files = getattr(self.owner, "files", None)
        if isinstance(files, dict):
            files[result["file"]] = path

    @_safe
    def reject(self, item: dict[str, Any]) -> None:
        from toolkit.stages.feedback import reject_feedback

        reject_feedback(self.owner.spec, item, log=self.owner.decisions)
        self.message.value = f"rejected {html.escape(item['file'])} (it stays in feedback/, nothing imported)"
        self.refresh()

    @_safe
    def similar(self, item: dict[str, Any]) -> None:
        from toolkit.stages.clean.embeddings import compute_embeddings

        spec = self.owner.spec
        emb, _, _ = compute_embeddings([spec.feedback_dir / item["file"]], arch=spec.arch,
                                       size=self.owner.size or spec.clean_size, cache_dir=spec.cleaned_dir / ".cache")
        self.owner.show_similar(vector=emb[0], title=f"feedback {item['file']}")
