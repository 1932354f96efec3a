"""The classifier dashboard that `apps/NAME.ipynb` shows (served by Voilà, see `toolkit serve`).

All logic lives here; the app notebooks are two lines. One `ClassifierDashboard` per page:

- title and description from settings.ini, and a model card from models/NAME/ (model.json,
  metrics.json, evaluation/metrics.json);
- an upload control (ipywidgets 8 `FileUpload.value`: a tuple of dicts with name, type, size,
  content) for one or several images; per image a thumbnail, the top predictions with
  probability bars and the inference time; a Grad-CAM overlay (toggle);
- a "wrong? the right label is ..." control that writes the image into the feedback folder:

      feedback/NAME/<label>/<UTC timestamp>_<original stem>.jpg   the upright RGB image (JPEG)
      feedback/NAME/feedback.jsonl                                 one line per saved image:
          {"time", "file" (relative to feedback/NAME), "label", "predicted", "probability",
           "probs", "original_name", "sha256", "model_created"}

  The feedback folder is laid out like a data folder (<class>/<file>), so the cleaner can list it
  and `toolkit train NAME --data feedback/NAME` (or merging it into the next data set) can use
  it; raw scrape/ data is never modified.

The pickle-free model is loaded once per kernel (`get_predictor` caches it per model folder and
weights file version); `load_learner` is never used. Every callback catches its errors and shows
one line in the page, so the kernel survives any upload. Widgets carry stable CSS classes
(`toolkit-*`) for tests and styling.
"""

from __future__ import annotations

import html
import io
import os
import time
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
from PIL import Image

from toolkit.core.artifacts import META_FILE, read_json
from toolkit.core.errors import ToolkitError
from toolkit.core.html import (
    MAX_UPLOAD_BYTES,
    THUMB,
    error_html,
    header_html,
    image_bytes,
    one_line,
    probability_bars,
    show_thumbnail,
)
from toolkit.core.html import shrunk as _shrunk
from toolkit.core.images import MAX_PIXELS, open_image
from toolkit.core.project import find_settings
from toolkit.settings import ClassifierSpec, load_settings
from toolkit.stages.feedback import save_feedback
from toolkit.tasks import Task, cached_predictor, task_of

MAX_FILES = 16  # per upload
NEW_CLASS = "a new class..."  # the feedback choice that opens a text field
EXAMPLES_DIR = "examples"  # models/NAME/examples/<class>/: a deployed bundle's example images
PER_CLASS_EXAMPLES = 2
MAX_EXAMPLES = 12
EXAMPLE_THUMB = 72
KEEP = 1024  # long side kept in memory for Grad-CAM and feedback
THREADS_ENV = "TOOLKIT_THREADS"  # torch threads per dashboard kernel (default 1, see docs/ARCHITECTURE.md)


get_predictor = cached_predictor  # the per-process model cache (toolkit.tasks)


def has_model(spec: ClassifierSpec) -> bool:
    return (spec.models_dir / META_FILE).is_file()












def model_card_html(spec: ClassifierSpec, meta: dict[str, Any], task: Task | None = None) -> str:
    """Classes, backbone, image size, training date, validation and evaluation metrics, and the rows
    the task kind adds (levels, ensemble members)."""
    task = task or task_of(spec)
    metrics = read_json(spec.models_dir / "metrics.json")
    evaluation = read_json(spec.models_dir / "evaluation" / "metrics.json")
    rows = [("classes", ", ".join(meta.get("classes", [])))]
    if "arch" in meta:
        rows += [("backbone", f"{meta['arch']}" + (" (ImageNet-pretrained)" if meta.get("pretrained") else "")),
                 ("image size", f"{meta.get('size', '?')} px, squished")]
    rows.append(("trained", str(meta.get("created", "?")).replace("T", " ")))
    data = meta.get("data", {})
    if data:
        rows.append(("training data", f"{data.get('n_train', '?')} train / {data.get('n_valid', '?')} valid images"))
    if "epochs_run" in metrics:  # the unfrozen epochs time_budget let run, of those asked for
        planned, ran = metrics.get("epochs", metrics["epochs_run"]), metrics["epochs_run"]
        top = (f" + {metrics['top_epochs_run']} top-stage (cached maps)"
               if metrics.get("top_epochs_run") else "")
        rows.append(("training", f"{metrics.get('freeze_epochs', '?')} frozen (cached features){top} + {ran} unfrozen "
                     f"epoch(s)" + (f" of {planned} (time_budget {metrics.get('time_budget', '?')} min)"
                                    if ran != planned else "")))
    if "accuracy" in metrics:
        rows.append(("validation accuracy", f"{metrics['accuracy']:.1%} on {metrics.get('n', '?')} images"))
        per_class = metrics.get("per_class", {})
        if per_class:
            rows.append(("per-class F1", ", ".join(f"{c} {v.get('f1', 0):.2f}" for c, v in per_class.items())))
    rows += task.card_rows(meta, metrics)
    if "accuracy" in evaluation:
        rows.append(("evaluation accuracy", f"{evaluation['accuracy']:.1%} on {evaluation.get('n', '?')} images"))
    cells = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
                    f"<td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<details open><summary><b>Model card</b></summary><table>{cells}</table></details>'


def example_files(spec: ClassifierSpec, classes: list[str],
                  per_class: int = PER_CLASS_EXAMPLES) -> list[tuple[str, Path]]:
    """(class, file) examples for the dashboard's strip: models/NAME/examples/<class>/ (a bundle), else
    the data set's own validation folder, else its class folders (the last files by name); at most
    MAX_EXAMPLES. Class names are checked before they become paths; none found is an empty list."""
    from toolkit.core.images import is_image_name
    from toolkit.core.names import check_name
    from toolkit.data import find_data_dir, valid_folder

    root = spec.models_dir / EXAMPLES_DIR
    if not root.is_dir():
        try:
            data = find_data_dir(spec)
        except Exception:
            return []
        root = valid_folder(data) or data
    found: list[tuple[str, Path]] = []
    for label in classes:
        try:
            folder = root / check_name(label, "class")
        except ToolkitError:
            continue
        if folder.is_dir():
            files = sorted(f for f in folder.iterdir() if is_image_name(f) and f.is_file() and not f.is_symlink())
            found += [(label, f) for f in files[-per_class:]]
    return found[:MAX_EXAMPLES]


def summary_table_html(results: list[ImageResult]) -> str:
    """Several uploads at once: one row per image (name, label, probability), above the cards."""
    rows = "".join(f"<tr><td>{html.escape(r.name)}</td><td class='toolkit-summary-label'>{html.escape(r.label)}</td>"
                   f"<td style='text-align:right'>{r.probs.get(r.label, 0):.1%}</td></tr>" for r in results)
    return ("<table class='toolkit-summary' style='border-collapse:collapse;margin:4px 0'>"
            "<tr><th style='text-align:left;padding-right:1em'>image</th><th style='text-align:left;"
            f"padding-right:1em'>label</th><th>probability</th></tr>{rows}</table>")


class ImageResult:
    """One uploaded image's card: thumbnail, predictions, time, Grad-CAM, feedback control."""

    def __init__(self, board: ClassifierDashboard, name: str, img: Image.Image, probs: dict[str, float],
                 seconds: float, decode_seconds: float, note: str = ""):
        self.board, self.name, self.img, self.probs = board, name, img, probs
        prediction = board.task.describe(board.classes, np.array([probs[c] for c in board.classes]))
        self.label = prediction.label
        path_line = board.task.prediction_html(prediction)  # e.g. a hierarchical path, a probability per level
        self.thumb = widgets.Image(format="jpeg")
        show_thumbnail(self.thumb, img)  # its own aspect, never stretched by the row
        self.thumb.add_class("toolkit-thumb")
        self.cam = widgets.Image(format="jpeg", layout=widgets.Layout(display="none"))
        self.cam.add_class("toolkit-cam")
        self.cam_done = False
        title = widgets.HTML(f"<b class='toolkit-name'>{html.escape(name)}</b>"
                             + (f" <i>({html.escape(note)})</i>" if note else ""))
        self.preds = widgets.HTML(path_line + probability_bars(probs))
        self.preds.add_class("toolkit-predictions")
        self.timing = widgets.HTML(
            f'<span class="toolkit-time">inference {seconds * 1000:.0f} ms '
            f'(decoding {decode_seconds * 1000:.0f} ms)</span>')
        self.choice = widgets.Dropdown(options=[("the right label is ...", ""), *[(c, c) for c in board.classes],
                                                (NEW_CLASS, NEW_CLASS)], value="", layout=widgets.Layout(width="14em"))
        self.choice.add_class("toolkit-right-choice")
        self.right = widgets.Text(placeholder="the new class", layout=widgets.Layout(width="12em", display="none"))
        self.right.add_class("toolkit-right-label")
        self.choice.observe(self._on_choice, names="value")
        self.save = widgets.Button(description="Save feedback", icon="check", tooltip="save into the feedback folder")
        self.save.add_class("toolkit-save-feedback")
        self.saved = widgets.HTML()
        self.saved.add_class("toolkit-feedback-status")
        self.save.on_click(lambda _: self.board._guard(self.save_feedback, self.saved))
        feedback = widgets.HBox([widgets.HTML("wrong?"), self.choice, self.right, self.save, self.saved])
        info = widgets.VBox([title, self.preds, self.timing, feedback])
        self.box = widgets.HBox([self.thumb, self.cam, info], layout=widgets.Layout(margin="6px 0"))
        self.box.add_class("toolkit-result")

    def show_cam(self, on: bool) -> None:
        if on and not self.cam_done:
            from toolkit.stages.explain import explain

            members = len(getattr(self.board.predictor, "members", None) or [0])  # an ensemble: side by side
            heatmaps = explain(self.board.predictor, _shrunk(self.img, 512))
            self.cam.value = image_bytes(_shrunk(heatmaps, THUMB * members))
            self.cam_done = True
        self.cam.layout.display = None if on else "none"

    def _on_choice(self, change) -> None:
        self.right.layout.display = None if change["new"] == NEW_CLASS else "none"

    def save_feedback(self) -> Path:
        """The label picked from the known classes, or the new class typed after "a new class..."."""
        picked = self.choice.value
        label = (picked if picked not in ("", NEW_CLASS) else self.right.value or "").strip()
        if not label:
            raise ToolkitError("type or pick the right label first")
        label = self.board.task.check_feedback_label(label)  # a class name, or a path (hierarchical)
        path = self.board.save_feedback(self.img, label, self.name, self.probs)
        self.saved.value = f'<span class="toolkit-ok">saved as {html.escape(label)}: {html.escape(path.name)}</span>'
        return path


class ClassifierDashboard:
    """The dashboard of one classifier: `ClassifierDashboard("NAME", "settings.ini")` or a spec."""

    def __init__(self, spec: ClassifierSpec | str, settings: str | Path | None = None):
        self.spec = spec if isinstance(spec, ClassifierSpec) else load_settings(find_settings(settings)).get(spec)
        self.feedback_dir = self.spec.feedback_dir
        self.task = task_of(self.spec)
        self.results: list[ImageResult] = []
        self.predictor: Any = None
        self.classes: list[str] = []
        spec = self.spec
        self.header = widgets.HTML(header_html(spec))
        self.status = widgets.HTML()
        self.status.add_class("toolkit-status")
        self.output = widgets.VBox()
        self.output.add_class("toolkit-results")
        self.upload = widgets.FileUpload(accept="image/*", multiple=True, description="Upload images")
        self.upload.add_class("toolkit-upload")
        self.cam_toggle = widgets.Checkbox(value=False, description="Grad-CAM heatmap", indent=False)
        self.cam_toggle.add_class("toolkit-cam-toggle")
        self.card = widgets.HTML()
        self.card.add_class("toolkit-model-card")
        try:
            if not has_model(spec):
                self.card.value = self.no_model_html()
                self.card.add_class("toolkit-no-model")
                self.upload.disabled = True
            else:
                self.predictor = get_predictor(spec.models_dir)
                self.classes = list(self.predictor.classes)
                self.card.value = model_card_html(spec, self.predictor.meta, self.task)
        except Exception as exc:  # a broken model folder: say so, keep the page alive
            self.predictor = None
            self.upload.disabled = True
            self.card.value = error_html(f"cannot load the model: {one_line(exc)}")
        self.upload.observe(self._on_upload, names="value")
        self.cam_toggle.observe(self._on_toggle, names="value")
        controls = widgets.HBox([self.upload, self.cam_toggle])
        self.examples = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap", align_items="flex-end"))
        self.examples.add_class("toolkit-examples")
        if self.predictor is not None:
            self._guard(self._fill_examples, self.status)
        self.widget = widgets.VBox([self.header, controls, self.examples, self.status, self.output, self.card])
        self.widget.add_class("toolkit-dashboard")

    # --------------------------------------------------------------- display

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def no_model_html(self) -> str:
        spec = self.spec
        return (f"<div class='toolkit-no-model'><b>No trained model for {html.escape(spec.name)} yet.</b> "
                f"Train it in the project folder <code>{html.escape(str(spec.root))}</code> with "
                f"<code>toolkit train {html.escape(spec.name)}</code>, then reload this page.</div>")

    def _fill_examples(self) -> None:
        """A strip of example images (a few per class); clicking one predicts it."""
        items: list[widgets.Widget] = []
        for label, path in example_files(self.spec, self.classes):
            try:
                thumb = widgets.Image(format="jpeg")
                show_thumbnail(thumb, open_image(path, draft_size=EXAMPLE_THUMB), EXAMPLE_THUMB)
            except Exception:
                continue
            button = widgets.Button(description="try", tooltip=f"predict this {label} example",
                                    layout=widgets.Layout(width=f"{EXAMPLE_THUMB}px"))
            button.on_click(lambda _, p=path: self._guard(
                lambda: self.handle_files([{"name": p.name, "content": p.read_bytes()}]), self.status))
            box = widgets.VBox([thumb, button], layout=widgets.Layout(margin="0 4px 0 0"))
            box.add_class("toolkit-example")
            items.append(box)
        if items:
            self.examples.children = (widgets.HTML("<b>try an example:</b>&nbsp;"), *items)

    # --------------------------------------------------------------- callbacks

    def _guard(self, action, where: widgets.HTML) -> Any:
        """Run a callback; any error becomes one line in `where` (the kernel survives)."""
        try:
            where.value = ""
            return action()
        except Exception as exc:
            where.value = error_html(one_line(exc))
            return None

    def _on_upload(self, change) -> None:
        files = change["new"]
        if not files:
            return
        self._guard(lambda: self.handle_files(files), self.status)
        try:
            self.upload.value = ()  # so that uploading the same file again is seen
        except Exception:  # pragma: no cover - never fatal
            pass

    def _on_toggle(self, change) -> None:
        def apply():
            for result in self.results:
                result.show_cam(bool(change["new"]))

        self._guard(apply, self.status)

    # --------------------------------------------------------------- work

    def handle_files(self, files) -> list[ImageResult]:
        """Predict each uploaded file (dicts with name and content); bad files get one line each."""
        if self.predictor is None:
            raise ToolkitError(f"no trained model: run `toolkit train {self.spec.name}` first")
        files = list(files)
        boxes: list[widgets.Widget] = []
        self.results = []
        if len(files) > MAX_FILES:
            boxes.append(widgets.HTML(error_html(f"{len(files)} files: only the first {MAX_FILES} are shown")))
            files = files[:MAX_FILES]
        for item in files:
            name = str(item.get("name") or "upload")
            try:
                result = self.predict_upload(name, item.get("content", b""))
            except Exception as exc:
                message = one_line(exc)
                if not message.startswith(name):
                    message = f"{name}: {message}"
                boxes.append(widgets.HTML(error_html(message)))
                continue
            self.results.append(result)
            boxes.append(result.box)
        if len(self.results) > 1:
            boxes.insert(0, widgets.HTML(summary_table_html(self.results)))
        self.output.children = tuple(boxes)
        if self.cam_toggle.value:
            for result in self.results:
                result.show_cam(True)
        return self.results

    def predict_upload(self, name: str, content) -> ImageResult:
        data = bytes(content) if content is not None else b""
        started = time.perf_counter()
        img = open_image(data, name=name, max_bytes=MAX_UPLOAD_BYTES, max_pixels=MAX_PIXELS)
        note = ""
        try:
            with Image.open(io.BytesIO(data)) as probe:
                if getattr(probe, "is_animated", False):
                    note = f"animated, first of {getattr(probe, 'n_frames', '?')} frames"
        except Exception:
            pass
        img = _shrunk(img, KEEP)
        decoded = time.perf_counter()
        probs = self.predictor.predict_images([img])[0]
        seconds = time.perf_counter() - decoded
        return ImageResult(self, name, img, dict(zip(self.classes, map(float, probs), strict=True)), seconds,
                           decoded - started, note)

    def save_feedback(self, img: Image.Image, label: str, original_name: str,
                      probs: dict[str, float] | None = None) -> Path:
        """Write feedback/NAME/<label>/<timestamp>_<stem>.jpg and a feedback.jsonl line
        (`toolkit.stages.feedback.save_feedback`: checked label, atomic writes, quota)."""
        label = self.task.check_feedback_label(label)  # a class name, or a path (hierarchical)
        return save_feedback(self.feedback_dir, img, label, original_name, probs,
                             self.predictor.meta.get("created") if self.predictor else None,
                             hierarchical="/" in label)


def dashboard(name: str, settings: str | Path | None = None) -> ClassifierDashboard | widgets.HTML:
    """What an app notebook shows: the task kind's own dashboard where it has one (task = pairs:
    two uploads), else the classifier dashboard; or one line saying what is wrong.

    Sets this kernel's torch threads to $TOOLKIT_THREADS (default 1): Voila runs one kernel per
    page, and on a small CPU several multi-threaded kernels oversubscribe the cores (measured on
    2 busy cores: 62 ms median per forward with 2 threads, 12 ms with 1).
    """
    try:
        import torch

        torch.set_num_threads(max(1, int(os.environ.get(THREADS_ENV) or 1)))
    except ValueError:
        pass
    try:
        spec = load_settings(find_settings(settings)).get(name)
        return task_of(spec).make_dashboard(spec) or ClassifierDashboard(spec)
    except Exception as exc:
        box = widgets.HTML(error_html(one_line(exc)))
        box.add_class("toolkit-dashboard")
        return box

