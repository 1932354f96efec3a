"""Grad-CAM: which parts of the image made the model say this class.

Works for every backbone of the registry because every model is `nn.Sequential(body, head)`
(`toolkit.core.backbones.create_model`): the body's output feature map is the layer explained.
The heatmap is the ReLU of the feature maps weighted by the spatially averaged gradients of the
target class's logit, resized to the image and scaled to 0..1 (Selvaraju et al., 2017).

An ensemble (`toolkit.tasks.ensemble.EnsemblePredictor`) is explained member by member, every member
for the same target (by default the ensemble's predicted class): `explain` puts the members'
overlays side by side, `explanation_png` (behind `toolkit explain NAME FILE`) draws the image and
one titled overlay per member.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from toolkit.core.artifacts import META_FILE
from toolkit.core.config import ClassifierSpec
from toolkit.core.errors import ToolkitError
from toolkit.core.images import open_image, squish
from toolkit.predict import ImagePredictor as Predictor
from toolkit.tasks import load_predictor, task_of_meta


def gradcam(predictor: Predictor, img: Image.Image, target: int | str | None = None) -> np.ndarray:
    """Heatmap (H, W) of `img`'s shape, values in 0..1, for class `target` (index or name).

    `target=None` explains the predicted class. Preprocessing is the predictor's (validation's).
    """
    img = img.convert("RGB")
    model = predictor.model
    body, head = model[0], model[1]
    if isinstance(target, str):
        if target not in predictor.classes:
            raise ValueError(f"{target!r} is not a class of this model ({', '.join(predictor.classes)})")
        target = predictor.classes.index(target)
    x = predictor.normalised([squish(img, predictor.size)])
    with torch.enable_grad():
        x = x.clone().requires_grad_(True)
        maps = body(x)  # a multi-stage body also returns its inner stages: the final map is explained
        features = maps[0] if isinstance(maps, tuple) else maps
        logits = head(maps)
        if target is None:
            target = int(logits.argmax(dim=1).item())
        if not 0 <= int(target) < logits.shape[1]:
            raise ValueError(f"target {target} is out of range for {logits.shape[1]} classes")
        (grads,) = torch.autograd.grad(logits[0, int(target)], features)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    raw = (weights * features).sum(dim=1)[0].detach()
    cam = raw.clamp(min=0)
    if float(cam.max()) <= 1e-12:  # nothing speaks for the class: show the least-negative evidence
        cam = raw - raw.min()
    cam = cam / cam.max() if float(cam.max()) > 0 else cam
    width, height = img.size
    resized = torch.nn.functional.interpolate(cam[None, None].float().cpu(), size=(height, width),
                                              mode="bilinear", align_corners=False)[0, 0]
    return resized.clamp(0, 1).numpy()


def _jet(values: np.ndarray) -> np.ndarray:
    """0..1 -> RGB uint8 with a jet-like colour map (blue low, red high), no matplotlib needed."""
    v = np.clip(values, 0, 1)[..., None]
    rgb = np.clip(np.concatenate([1.5 - np.abs(4 * v - 3), 1.5 - np.abs(4 * v - 2), 1.5 - np.abs(4 * v - 1)],
                                 axis=-1), 0, 1)
    return (rgb * 255).astype(np.uint8)


def overlay(img: Image.Image, heatmap: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The image with the heatmap blended over it (PIL RGB, the image's size)."""
    img = img.convert("RGB")
    if heatmap.shape != (img.height, img.width):
        heat = Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).resize(img.size, Image.BILINEAR)
        heatmap = np.asarray(heat, dtype=np.float32) / 255
    colour = Image.fromarray(_jet(heatmap), "RGB")
    return Image.blend(img, colour, alpha)


def _models(predictor: Any) -> dict[str, Predictor]:
    """{name: Predictor}: an ensemble's members, or the one model as {"model": predictor}."""
    return dict(getattr(predictor, "members", None) or {"model": predictor})


def resolve_target(predictor: Any, img: Image.Image, target: int | str | None) -> int:
    """A class index: `target` by name or index, else the (ensemble's) predicted class."""
    classes = list(predictor.classes)
    if target is None:
        return int(predictor.predict_images([img.convert("RGB")])[0].argmax())
    if isinstance(target, str):
        if target not in classes:
            raise ToolkitError(f"--target {target!r} is not a class of this model ({', '.join(classes)})")
        return classes.index(target)
    if not 0 <= int(target) < len(classes):
        raise ToolkitError(f"target {target} is out of range for {len(classes)} classes")
    return int(target)


def gradcams(predictor: Any, img: Image.Image, target: int | str | None = None) -> dict[str, np.ndarray]:
    """One heatmap per member of an ensemble ({"model": heatmap} for one model), all for the same
    target (default: the ensemble's predicted class)."""
    index = resolve_target(predictor, img, target)
    return {name: gradcam(model, img, index) for name, model in _models(predictor).items()}


def side_by_side(images: list[Image.Image], gap: int = 4) -> Image.Image:
    """Images of one height next to each other on white."""
    height = max(i.height for i in images)
    strip = Image.new("RGB", (sum(i.width for i in images) + gap * (len(images) - 1), height), "white")
    x = 0
    for image in images:
        strip.paste(image, (x, 0))
        x += image.width + gap
    return strip


def explain(predictor: Any, img: Image.Image, target: int | str | None = None,
            alpha: float = 0.45) -> Image.Image:
    """Grad-CAM overlay of `img` for `target` (default: the predicted class); for an ensemble the
    members' overlays side by side, in member order."""
    return side_by_side([overlay(img, heat, alpha) for heat in gradcams(predictor, img, target).values()])


def explanation_png(predictor: Any, img: Image.Image, path: Path, target: int | str | None = None,
                    alpha: float = 0.45) -> Path:
    """A PNG: the image (titled with the (ensemble's) prediction) and one Grad-CAM overlay per
    model or member, each titled with the explained class and that model's probability of it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = img.convert("RGB")
    index = resolve_target(predictor, img, target)
    classes = list(predictor.classes)
    probs = predictor.predict_images([img])[0]
    mode = getattr(predictor, "mode", None)
    who = f"ensemble ({mode})" if mode else "predicted"
    panels = [(img, f"{who}: {classes[int(probs.argmax())]} ({probs.max():.1%})")]
    for name, model in _models(predictor).items():
        p = float(model.predict_images([img])[0][index])
        label = f"{name}: " if name != "model" else ""
        panels.append((overlay(img, gradcam(model, img, index), alpha),
                       f"{label}{classes[index]} p={p:.1%}\n{model.meta.get('arch', '?')}, {model.size} px"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (image, title) in zip(np.atleast_1d(axes), panels):
        ax.imshow(image)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"Grad-CAM for class {classes[index]}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def explain_file(spec: ClassifierSpec, file: Path, *, target: str | None = None,
                 out: Path | None = None) -> tuple[Path, Any]:
    """`toolkit explain NAME FILE`: Grad-CAM of FILE as a PNG (default models/NAME/explanations/STEM.png);
    returns the PNG's path and the prediction. A task kind without explanations refuses in one line."""
    predictor = load_predictor(spec.models_dir)
    task_of_meta(predictor.meta, str(spec.models_dir / META_FILE)).require("explain", spec.name, "explain")
    out = Path(out) if out else spec.models_dir / "explanations" / f"{Path(file).stem}.png"
    if out.suffix.lower() != ".png":
        raise ToolkitError(f"--out {out}: give a .png file name")
    img = open_image(file, name=str(file))
    explanation_png(predictor, img, out, target=target)
    return out, predictor.predict(img)
