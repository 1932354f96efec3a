"""The lean inference path that `toolkit predict`, `toolkit evaluate`, the cleaning app and the
dashboards use: the pickle-free model (toolkit.core.artifacts) rebuilt without fastai, run under
`torch.inference_mode`. Preprocessing matches validation exactly: open_image -> squish to size
(bilinear) -> normalise (`toolkit.core.images.to_batch`).

`Predictor` is the protocol every task kind's predictor follows; `ImagePredictor` is the one-image
model that single-label, hierarchical and ensemble predictors build on. Which predictor a model
folder needs is the task registry's business: `toolkit.tasks.load_predictor(folder)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from toolkit.core.artifacts import load_weights, read_meta
from toolkit.core.backbones import inference_model, model_taps
from toolkit.core.images import ImageSource, load_squished, open_image, squish, to_batch
from toolkit.core.progress import progress_iter


@dataclass
class Prediction:
    """One image's label and the probability of every class."""

    label: str
    probs: dict[str, float]

    @property
    def probability(self) -> float:
        return self.probs[self.label]

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "probability": round(self.probability, 5),
                "probs": {k: round(v, 5) for k, v in self.probs.items()}}

    def line(self) -> str:
        return f"{self.label}\t{self.probability:.3f}"


class Predictor(Protocol):
    """What every task kind's predictor offers: its model.json, classes and input size, how many
    images one prediction takes (`n_inputs`), and `predict_sources` (paths, bytes or PIL images)."""

    meta: dict[str, Any]
    classes: list[str]
    size: int
    n_inputs: int

    def predict_sources(self, sources: Sequence[ImageSource | Image.Image],
                        names: Sequence[str | None] | None = None) -> Any: ...


def describe_argmax(classes: Sequence[str], probs: np.ndarray) -> Prediction:
    """Probabilities -> the most probable class (a task kind may describe otherwise)."""
    return Prediction(classes[int(np.argmax(probs))], dict(zip(classes, map(float, probs), strict=True)))


class ImagePredictor:
    """Loads a one-image model folder once; predicts from paths, bytes or PIL images. No fastai at
    run time. `task` (a toolkit.tasks Task) turns probabilities into a Prediction."""

    n_inputs = 1

    def __init__(self, folder: str | Path, device: str | None = None, optimize: bool = False, task: Any = None,
                 meta: dict[str, Any] | None = None):
        folder = Path(folder)
        self.folder = folder
        self.meta = meta if meta is not None else read_meta(folder)
        self.task = task
        self.classes: list[str] = list(self.meta["classes"])
        self.size = int(self.meta["size"])
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_weights(self.build_model(), folder)
        self.model.eval().to(self.device)
        self.mean, self.std = self.meta["mean"], self.meta["std"]
        self._mean_std = (torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1),
                          torch.tensor(self.std, device=self.device).view(1, 3, 1, 1))  # made once, not per batch
        self.fast_model: torch.nn.Module | None = self._optimized() if optimize else None

    def build_model(self) -> torch.nn.Module:
        """The untrained network model.json describes (other task kinds build other networks)."""
        return inference_model(self.meta["arch"], len(self.classes), model_taps(self.meta))

    def _optimized(self) -> torch.nn.Module | None:
        """A frozen, channels-last TorchScript copy for CPU serving (batch norm folded into the
        convolutions; measured on a 2-core CPU at 96 px: 4.6 ms against 13.3 ms eager), or None
        where it cannot be built. `self.model` stays the eager module (Grad-CAM needs gradients)."""
        if self.device.type != "cpu":
            return None
        import copy
        import warnings

        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                example = torch.zeros(1, 3, self.size, self.size).contiguous(memory_format=torch.channels_last)
                model = copy.deepcopy(self.model).to(memory_format=torch.channels_last)
                fast = torch.jit.freeze(torch.jit.trace(model, example))
                probe = torch.linspace(-2, 2, 3 * self.size * self.size).view(1, 3, self.size, self.size)
                expected = self.model(probe)
                if not torch.allclose(fast(probe.contiguous(memory_format=torch.channels_last)), expected,
                                      atol=1e-4, rtol=1e-3):
                    return None
            return fast
        except Exception:  # an op TorchScript cannot freeze: the eager model serves
            return None

    def normalised(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """size x size uint8 arrays -> the model's normalised input batch on its device."""
        return to_batch(arrays, self.mean, self.std, self.device)

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """RGB image -> (3, size, size) float tensor in 0..1, as validation saw it."""
        return to_batch([squish(img, self.size)])[0]

    def predict_tensors(self, batch: torch.Tensor, tta: bool = False) -> np.ndarray:
        """(N, 3, size, size) in 0..1 -> (N, classes) probabilities."""
        with torch.inference_mode():
            mean, std = self._mean_std
            x = (batch.to(self.device) - mean) / std
            model = self.model
            if self.fast_model is not None:
                model, x = self.fast_model, x.contiguous(memory_format=torch.channels_last)
            probs = model(x).softmax(dim=1)
            if tta:
                probs = (probs + model(x.flip(3)).softmax(dim=1)) / 2
        return probs.cpu().numpy()

    def predict_arrays(self, arrays: Sequence[np.ndarray], bs: int = 64, tta: bool = False) -> np.ndarray:
        out = [np.zeros((0, len(self.classes)), dtype=np.float32)]
        for start in range(0, len(arrays), bs):
            out.append(self.predict_tensors(to_batch(arrays[start : start + bs]), tta=tta))
        return np.concatenate(out)

    def predict_images(self, images: Sequence[Image.Image], bs: int = 64, tta: bool = False) -> np.ndarray:
        return self.predict_arrays([squish(img, self.size) for img in images], bs=bs, tta=tta)

    def predict_files(self, files: Sequence[Path], *, tta: bool = False, bs: int = 64,
                      progress: bool = True) -> np.ndarray:
        """(N, classes) probabilities of image files, in batches, preprocessed as validation is."""
        out = [np.zeros((0, len(self.classes)), dtype=np.float32)]
        for start in progress_iter(range(0, len(files), bs), label="predicting", enabled=progress):
            out.append(self.predict_arrays([load_squished(f, self.size) for f in files[start : start + bs]],
                                           bs=bs, tta=tta))
        return np.concatenate(out)

    def describe(self, probs: np.ndarray) -> Prediction:
        return self.task.describe(self.classes, probs) if self.task is not None else describe_argmax(
            self.classes, probs)

    def predict(self, src: ImageSource | Image.Image, name: str | None = None) -> Prediction:
        """One image (path, bytes, file object or PIL image) -> label and probabilities."""
        img = src if isinstance(src, Image.Image) else open_image(src, name=name, draft_size=self.size)
        return self.describe(self.predict_images([img.convert("RGB")])[0])

    def predict_sources(self, sources: Sequence[ImageSource | Image.Image],
                        names: Sequence[str | None] | None = None) -> Prediction:
        (src,) = sources
        return self.predict(src, name=(names or [None])[0])
