"""A pickle-free model format and the lean predictor that serving and `toolkit predict` use.

models/NAME/model.safetensors  the weights (safetensors: tensors only, no code)
models/NAME/model.json         classes, backbone, size, normalisation, task, versions, provenance

Loading never unpickles (`load_learner` runs arbitrary code and breaks across versions).
Preprocessing matches validation exactly: open_image -> squish to size (bilinear) -> normalise.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from toolkit import __version__
from toolkit.core.backbones import get_backbone
from toolkit.core.errors import ToolkitError
from toolkit.core.images import ImageSource, open_image

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


def versions() -> dict[str, str]:
    import fastai
    import timm
    import torchvision

    return {"toolkit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "fastai": fastai.__version__, "timm": timm.__version__}


def export_model(model: torch.nn.Module, folder: Path, meta: dict[str, Any]) -> Path:
    """Write weights (safetensors) and model.json; `meta` needs arch, classes, size, mean, std."""
    from safetensors.torch import save_file

    for key in ("arch", "classes", "size", "mean", "std"):
        if key not in meta:
            raise ValueError(f"model metadata lacks {key!r}")
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    full = {"format_version": FORMAT_VERSION, "task": "single", "resize": "squish",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(), **meta}
    (folder / META_FILE).write_text(json.dumps(full, indent=2) + "\n")
    return folder / META_FILE


class ConcatPool(torch.nn.Module):
    """fastai's AdaptiveConcatPool2d: max and average pooling, concatenated (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.nn.functional.adaptive_max_pool2d(x, 1),
                          torch.nn.functional.adaptive_avg_pool2d(x, 1)], 1)


class FlattenBatch(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


def inference_model(arch: str, n_out: int) -> torch.nn.Sequential:
    """The same network as `backbones.create_model(arch, n_out, pretrained=False)`, with the same
    state_dict keys, built without importing fastai (which costs a serving kernel seconds and
    hundreds of MB): body + fastai's default head (concat pool, flatten, BN, dropout, linear 512,
    ReLU, BN, dropout, linear), as laid out by fastai 2.8's `create_head`."""
    nf = get_backbone(arch).n_features * 2
    return torch.nn.Sequential(inference_body(arch), torch.nn.Sequential(ConcatPool(), FlattenBatch(),
                                                                         *linear_head(nf, n_out)))


def inference_body(arch: str) -> torch.nn.Module:
    """The registry's body for `arch`, untrained, built without fastai (same state_dict keys)."""
    if arch.startswith("resnet"):
        import torchvision.models as tvm

        return torch.nn.Sequential(*list(getattr(tvm, arch)(weights=None).children())[:-2])  # fastai's cut
    return get_backbone(arch).create_body(False)


def linear_head(n_in: int, n_out: int) -> list[torch.nn.Module]:
    """fastai 2.8's `create_head` after pooling: BN, dropout, linear 512, ReLU, BN, dropout, linear."""
    from torch import nn

    return [nn.BatchNorm1d(n_in), nn.Dropout(0.25), nn.Linear(n_in, 512, bias=False), nn.ReLU(inplace=True),
            nn.BatchNorm1d(512), nn.Dropout(0.5), nn.Linear(512, n_out, bias=False)]


def read_meta(folder: str | Path) -> dict[str, Any]:
    """models/NAME/model.json, or a one-line ToolkitError saying how to get one."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise ToolkitError(f"no trained model in {folder} ({META_FILE} missing): "
                           f"run `toolkit train {folder.name}` first")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ToolkitError(f"{meta_path}: not valid JSON ({exc})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ToolkitError(f"{meta_path}: format_version {meta.get('format_version')} is not "
                           f"{FORMAT_VERSION}; retrain with this toolkit")
    return meta


def load_predictor(folder: str | Path, device: str | None = None, optimize: bool = False) -> Predictor:
    """The predictor model.json's "task" calls for: `Predictor` (single), `pairs.PairPredictor`
    or `hierarchy.HierarchicalPredictor` (top-down paths); `ensemble.EnsemblePredictor` where it has
    an "ensemble" block. All offer classes, size, meta, predict and predict_images."""
    meta = read_meta(folder)
    if "ensemble" in meta:
        from toolkit.ensemble import EnsemblePredictor

        return EnsemblePredictor(folder, device=device, optimize=optimize)
    task = meta.get("task", "single")
    if task == "pairs":
        from toolkit.pairs import PairPredictor

        return PairPredictor(folder, device=device, optimize=optimize)
    if task == "hierarchical":
        from toolkit.hierarchy import HierarchicalPredictor

        return HierarchicalPredictor(folder, device=device, optimize=optimize)
    if task != "single":
        raise ToolkitError(f"{Path(folder) / META_FILE}: task {task!r} is not known to this toolkit")
    return Predictor(folder, device=device, optimize=optimize)


@dataclass
class Prediction:
    label: str
    probs: dict[str, float]

    @property
    def probability(self) -> float:
        return self.probs[self.label]


class Predictor:
    """Loads models/NAME once; predicts from paths, bytes or PIL images. No fastai at run time."""

    def __init__(self, folder: str | Path, device: str | None = None, optimize: bool = False):
        folder = Path(folder)
        self.meta = read_meta(folder)
        if "ensemble" in self.meta:
            raise ToolkitError(f"{folder / META_FILE} describes an ensemble: load it with "
                               "toolkit.model_io.load_predictor")
        from safetensors.torch import load_file

        self.folder = folder
        self.classes: list[str] = list(self.meta["classes"])
        self.size = int(self.meta["size"])
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = self.build_model()
        self.model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
        self.model.eval().to(self.device)
        self.mean = torch.tensor(self.meta["mean"]).view(1, 3, 1, 1).to(self.device)
        self.std = torch.tensor(self.meta["std"]).view(1, 3, 1, 1).to(self.device)
        self.fast_model: torch.nn.Module | None = self._optimized() if optimize else None

    def build_model(self) -> torch.nn.Module:
        """The untrained network model.json describes (subclasses build other tasks' networks)."""
        return inference_model(self.meta["arch"], len(self.classes))

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

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """RGB image -> (3, size, size) float tensor in 0..1, as validation saw it."""
        resized = img.resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255

    def predict_tensors(self, batch: torch.Tensor, tta: bool = False) -> np.ndarray:
        """(N, 3, size, size) in 0..1 -> (N, classes) probabilities."""
        with torch.inference_mode():
            x = (batch.to(self.device) - self.mean) / self.std
            model = self.model
            if self.fast_model is not None:
                model, x = self.fast_model, x.contiguous(memory_format=torch.channels_last)
            probs = model(x).softmax(dim=1)
            if tta:
                probs = (probs + model(x.flip(3)).softmax(dim=1)) / 2
        return probs.cpu().numpy()

    def predict_images(self, images: Sequence[Image.Image], bs: int = 64, tta: bool = False) -> np.ndarray:
        out = []
        for start in range(0, len(images), bs):
            batch = torch.stack([self.preprocess(img) for img in images[start : start + bs]])
            out.append(self.predict_tensors(batch, tta=tta))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def predict(self, src: ImageSource | Image.Image, name: str | None = None) -> Prediction:
        """One image (path, bytes, file object or PIL image) -> label and probabilities."""
        img = src if isinstance(src, Image.Image) else open_image(src, name=name, draft_size=self.size)
        probs = self.predict_images([img.convert("RGB")])[0]
        return Prediction(self.classes[int(probs.argmax())], dict(zip(self.classes, probs.tolist(), strict=True)))
