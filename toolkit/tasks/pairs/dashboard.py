"""The shoe-pairs dashboard (`task = pairs`): two photos in, "same pair" or "different pairs" out.

`toolkit.ui.dashboard.dashboard(NAME)` returns a `PairDashboard` when the section's task is pairs,
so apps/NAME.ipynb stays the same two lines. Two FileUploads (one photo each, thumbnails shown),
an approach selector when both approaches were trained (default: the one `toolkit train` chose),
the verdict with the probability of "same pair" and the inference time, and a model card that
compares the approaches (overall, per group, per kind of pair). Errors are one line in the page.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import ipywidgets as widgets
from PIL import Image

from toolkit.core.artifacts import META_FILE, read_json
from toolkit.core.config import ClassifierSpec
from toolkit.core.errors import ToolkitError
from toolkit.core.html import (
    MAX_UPLOAD_BYTES,
    error_html,
    header_html,
    one_line,
    probability_bars,
    show_thumbnail,
    shrunk,
)
from toolkit.core.images import MAX_PIXELS, open_image
from toolkit.tasks.registry import cached_predictor

SAME, DIFFERENT = "same pair", "different pairs"




def approach_folders(spec: ClassifierSpec) -> dict[str, Path]:
    """approach -> model folder: models/NAME/<approach>/ when both were trained, else models/NAME."""
    folders = {a: spec.models_dir / a for a in ("siamese", "stacked") if (spec.models_dir / a / META_FILE).is_file()}
    if not folders and (spec.models_dir / META_FILE).is_file():
        folders[read_json(spec.models_dir / META_FILE).get("approach", "model")] = spec.models_dir
    return folders


def pairs_card_html(spec: ClassifierSpec, meta: dict[str, Any]) -> str:
    """Backbone, size, data, and each approach's validation accuracy overall, per group and per kind."""
    metrics = read_json(spec.models_dir / "metrics.json")
    data = meta.get("data", {})
    approaches = metrics.get("approaches") or ({meta.get("approach", "?"): metrics} if "accuracy" in metrics else {})
    rows = [("backbone", f"{meta.get('arch', '?')}" + (" (ImageNet-pretrained)" if meta.get("pretrained") else "")),
            ("image size", f"{meta.get('size', '?')} px per photo"),
            ("trained", str(meta.get("created", "?")).replace("T", " ")),
            ("served by default", str(metrics.get("chosen", meta.get("approach", "?"))))]
    if data:
        rows.append(("training data", f"{data.get('photos', '?')} photos of {data.get('people', '?')} people; "
                                      f"{data.get('train_pairs', '?')} train / {data.get('valid_pairs', '?')} valid "
                                      f"pairs, {data.get('valid_people', '?')} people held out"))
    table = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
                    f"<td>{html.escape(v)}</td></tr>" for k, v in rows)
    groups = sorted({g for m in approaches.values() for g in m.get("groups", {})})
    kinds = [k for k in ("positive", "hard", "easy") if any(k in m.get("kinds", {}) for m in approaches.values())]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["approach", "overall", *groups, *kinds])
    body = ""
    for name, m in approaches.items():
        cells = [f"{m.get('accuracy', 0):.1%}"]
        cells += [f"{m['groups'][g]['accuracy']:.1%}" if g in m.get("groups", {}) else "-" for g in groups]
        cells += [f"{m['kinds'][k]['accuracy']:.1%}" if k in m.get("kinds", {}) else "-" for k in kinds]
        body += (f"<tr class='toolkit-approach-row'><td>{html.escape(name)}</td>"
                 + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    comparison = (f"<p>Validation accuracy on people never seen in training (groups: {', '.join(groups)}):</p>"
                  f"<table class='toolkit-approaches'><tr>{head}</tr>{body}</table>"
                  "<p><i>Easy negatives pair two different people's shoes (different backgrounds): close to "
                  "trivial. Hard negatives are the same person's other pairs.</i></p>") if approaches else ""
    return f"<details open><summary><b>Model card</b></summary><table>{table}</table>{comparison}</details>"


class PairDashboard:
    """Upload two shoe photos and see whether they are one pair: `PairDashboard(spec)`."""

    def __init__(self, spec: ClassifierSpec):
        self.spec = spec
        self.images: list[Image.Image | None] = [None, None]
        self.names = ["", ""]
        self.header = widgets.HTML(header_html(spec))
        self.status = widgets.HTML()
        self.status.add_class("toolkit-status")
        self.result = widgets.HTML()
        self.result.add_class("toolkit-pair-result")
        self.uploads, self.thumbs = [], []
        for label in ("first shoe", "second shoe"):
            upload = widgets.FileUpload(accept="image/*", multiple=False, description=f"Upload {label}",
                                        layout=widgets.Layout(width="auto", min_width="13em"))
            upload.add_class("toolkit-upload")
            thumb = widgets.Image(format="jpeg", layout=widgets.Layout(display="none"))  # shown once uploaded
            thumb.add_class("toolkit-thumb")
            self.uploads.append(upload)
            self.thumbs.append(thumb)
        self.card = widgets.HTML()
        self.card.add_class("toolkit-model-card")
        self.folders = approach_folders(spec)
        chosen = read_json(spec.models_dir / "metrics.json").get("chosen")
        options = list(self.folders)
        self.approach = widgets.Dropdown(options=options, value=chosen if chosen in options else
                                         (options[0] if options else None), description="approach")
        self.approach.add_class("toolkit-approach")
        self.approach.layout.display = None if len(options) > 1 else "none"
        try:
            if not options:
                self.card.value = (f"<div class='toolkit-no-model'><b>No trained model for {html.escape(spec.name)} "
                                   f"yet.</b> Train it with <code>toolkit train {html.escape(spec.name)}</code>, "
                                   "then reload this page.</div>")
                self.card.add_class("toolkit-no-model")
                for upload in self.uploads:
                    upload.disabled = True
            else:
                self.card.value = pairs_card_html(spec, self.predictor.meta)
        except Exception as exc:  # a broken model folder: say so, keep the page alive
            for upload in self.uploads:
                upload.disabled = True
            self.card.value = error_html(f"cannot load the model: {one_line(exc)}")
        for index, upload in enumerate(self.uploads):
            upload.observe(lambda change, i=index: self._on_upload(i, change), names="value")
        self.approach.observe(lambda _: self._guard(self.compare), names="value")
        columns = [widgets.VBox([u, t]) for u, t in zip(self.uploads, self.thumbs)]
        self.widget = widgets.VBox([self.header, widgets.HBox(columns), self.approach, self.status, self.result,
                                    self.card])
        self.widget.add_class("toolkit-dashboard")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    @property
    def predictor(self):
        if not self.approach.value:
            raise ToolkitError(f"no trained model: run `toolkit train {self.spec.name}` first")
        return cached_predictor(self.folders[self.approach.value])

    def _guard(self, action) -> Any:
        try:
            self.status.value = ""
            return action()
        except Exception as exc:
            self.status.value = error_html(one_line(exc))
            return None

    def _on_upload(self, index: int, change) -> None:
        files = change["new"]
        if not files:
            return
        self._guard(lambda: self.set_photo(index, str(files[0].get("name") or "upload"), files[0].get("content", b"")))
        try:
            self.uploads[index].value = ()  # so that uploading the same file again is seen
        except Exception:  # pragma: no cover - never fatal
            pass

    def set_photo(self, index: int, name: str, content) -> str | None:
        """Decode one upload (one-line errors), show it, and compare once both photos are there."""
        self.images[index], self.names[index], self.result.value = None, "", ""
        show_thumbnail(self.thumbs[index], None)
        img = open_image(bytes(content or b""), name=name, max_bytes=MAX_UPLOAD_BYTES, max_pixels=MAX_PIXELS)
        self.images[index], self.names[index] = shrunk(img, 1024), name
        show_thumbnail(self.thumbs[index], img)
        return self.compare()

    def compare(self) -> str | None:
        """'same pair' or 'different pairs' with its probability, once both photos are uploaded."""
        if any(img is None for img in self.images):
            self.result.value = "<i>upload the other shoe too</i>" if any(self.images) else ""
            return None
        predictor = self.predictor
        started = time.perf_counter()
        prediction = predictor.predict_pair(self.images[0], self.images[1])
        seconds = time.perf_counter() - started
        verdict = SAME if prediction.same else DIFFERENT
        probs = {SAME: prediction.probability, DIFFERENT: 1 - prediction.probability}
        self.result.value = (f"<h3 class='toolkit-verdict'>{html.escape(verdict)}</h3>"
                             + probability_bars(probs, k=2)
                             + f"<span class='toolkit-time'>{html.escape(prediction.approach)} model, "
                               f"{seconds * 1000:.0f} ms</span>")
        return verdict
