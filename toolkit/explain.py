"""Grad-CAM: which parts of the image made the model say this class.

Works for every backbone of the registry because every model is `nn.Sequential(body, head)`
(`toolkit.backbones.create_model`): the body's output feature map is the layer explained.
The heatmap is the ReLU of the feature maps weighted by the spatially averaged gradients of the
target class's logit, resized to the image and scaled to 0..1 (Selvaraju et al., 2017).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .model_io import Predictor


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
    x = predictor.preprocess(img).unsqueeze(0).to(predictor.device)
    x = (x - predictor.mean) / predictor.std
    with torch.enable_grad():
        x = x.clone().requires_grad_(True)
        features = body(x)
        logits = head(features)
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


def explain(predictor: Predictor, img: Image.Image, target: int | str | None = None,
            alpha: float = 0.45) -> Image.Image:
    """Grad-CAM overlay of `img` for `target` (default: the predicted class)."""
    return overlay(img, gradcam(predictor, img, target), alpha)
