"""task = pairs, serving: `PairPredictor` loads the pickle-free export without fastai; `score_pairs`
computes every figure (overall, per group, per kind) through `metrics_from_probs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from toolkit.core.artifacts import META_FILE
from toolkit.core.backbones import get_backbone, inference_body, inference_model, model_taps
from toolkit.core.config import ClassifierSpec
from toolkit.core.errors import ToolkitError
from toolkit.core.images import ImageSource, open_image, squish
from toolkit.core.metrics import accuracy_by, metrics_from_probs
from toolkit.predict import ImagePredictor
from toolkit.tasks.pairs.data import EASY_NOTE, LABELS, Pair, build_pairs, parse_photos
from toolkit.tasks.pairs.model import SiameseModel, decode_pairs, stack_pair

# ---------------------------------------------------------------- serving


@dataclass
class PairPrediction:
    same: bool
    probability: float  # of "same pair"
    approach: str

    @property
    def label(self) -> str:
        return "same pair" if self.same else "different pairs"

    def line(self) -> str:
        return f"{self.label}\tp(same)={self.probability:.3f}\t({self.approach})"

    def as_dict(self) -> dict[str, Any]:
        return {"same": self.same, "label": self.label, "probability_same": round(self.probability, 5),
                "approach": self.approach}


class PairPredictor(ImagePredictor):
    """models/NAME (task = pairs) without fastai or pickles. `symmetric` (the default) averages the
    stacked model over both orders (a|b and b|a); the siamese model is order-free by design."""

    n_inputs = 2

    def build_model(self) -> nn.Module:

        self.approach = self.meta.get("approach", "")
        if self.approach == "stacked":
            return inference_model(self.meta["arch"], len(self.classes), model_taps(self.meta))
        if self.approach == "siamese":
            return SiameseModel(inference_body(self.meta["arch"]), get_backbone(self.meta["arch"]).n_features,
                                len(self.classes), taps=model_taps(self.meta))
        raise ToolkitError(f"{self.folder / META_FILE}: unknown pairs approach {self.approach!r}; retrain")

    def _optimized(self) -> None:
        """Pairs serve the eager model (the TorchScript copy is for single-input classifiers)."""
        return None

    def predict_arrays(self, a: Sequence[np.ndarray], b: Sequence[np.ndarray], symmetric: bool = True,
                       bs: int = 64) -> np.ndarray:
        """Photos as size x size uint8 arrays (a[i] with b[i]) -> (N, 2) probabilities (different, same)."""
        out = []
        with torch.inference_mode():
            for start in range(0, len(a), bs):
                xa, xb = a[start : start + bs], b[start : start + bs]
                if self.approach == "siamese":
                    probs = self.model(self.normalised(xa), self.normalised(xb)).softmax(dim=1)
                else:
                    probs = self.model(self.normalised([stack_pair(i, j, self.size) for i, j in zip(xa, xb)]))
                    probs = probs.softmax(dim=1)
                    if symmetric:
                        flipped = self.normalised([stack_pair(j, i, self.size) for i, j in zip(xa, xb)])
                        probs = (probs + self.model(flipped).softmax(dim=1)) / 2
                out.append(probs.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def predict_pair(self, a: ImageSource | Image.Image, b: ImageSource | Image.Image,
                     names: tuple[str | None, str | None] = (None, None)) -> PairPrediction:
        """Two photos (paths, bytes, file objects or PIL images) -> same pair or not, with probability."""
        arrays = [squish(src if isinstance(src, Image.Image) else open_image(src, name=name, draft_size=self.size),
                         self.size) for src, name in zip((a, b), names)]
        p_same = float(self.predict_arrays([arrays[0]], [arrays[1]])[0, LABELS.index("same")])
        return PairPrediction(p_same >= 0.5, p_same, self.approach)

    def predict_sources(self, sources: Sequence[ImageSource | Image.Image],
                        names: Sequence[str | None] | None = None) -> PairPrediction:
        a, b = sources
        return self.predict_pair(a, b, names=tuple(names) if names else (None, None))


def score_pairs(predictor: PairPredictor, pairs: Sequence[Pair], arrays: dict[Path, np.ndarray] | None = None,
                *, symmetric: bool = True, progress: bool = False) -> dict:
    """Accuracy overall, per group and per kind (positive / hard / easy), with the confusion matrix,
    through `metrics_from_probs`; images decoded once at the predictor's size unless given."""
    if arrays is None:
        arrays = decode_pairs(pairs, predictor.size, progress=progress)
    probs = predictor.predict_arrays([arrays[p.a] for p in pairs], [arrays[p.b] for p in pairs], symmetric=symmetric)
    labels = [p.label for p in pairs]
    metrics = metrics_from_probs(probs, labels, LABELS, group_names=[p.group for p in pairs])
    correct = probs.argmax(axis=1) == np.array([int(p.same) for p in pairs])
    metrics["kinds"] = accuracy_by(correct, [p.kind for p in pairs])
    metrics["kinds_by_group"] = accuracy_by(correct, [f"{p.kind}/{p.group}" for p in pairs])
    metrics["people"] = len({person for p in pairs for person in p.people})
    metrics["symmetric"] = symmetric and predictor.approach == "stacked"
    metrics["approach"] = predictor.approach
    metrics["note"] = EASY_NOTE
    return metrics


def evaluate_pairs(predictor: PairPredictor, folder: Path, spec: ClassifierSpec, *, progress: bool = True) -> dict:
    """Pairs built from every photo in `folder` (named by the section's pair_rule), scored."""
    photos, bad = parse_photos(folder, spec.pair_rule, where=f"[{spec.name}] pair_rule", progress=progress)
    pairs = build_pairs(photos, spec.negatives, spec.hard_share, spec.seed)
    if not pairs:
        raise ToolkitError(f"{folder}: no complete pairs (left and right) to evaluate")
    metrics = score_pairs(predictor, pairs, progress=progress)
    metrics["bad_files"] = [{"file": str(b.path), "reason": b.reason} for b in bad]
    metrics["data"] = str(folder)
    return metrics


def format_pairs_report(metrics: dict) -> str:
    """Plain text: overall, per group, per kind."""
    lines = [f"accuracy {metrics['accuracy']:.2%} on {metrics['n']} pairs of {metrics.get('people', '?')} people "
             f"({metrics.get('approach', '?')})"]
    for title, key in (("group", "groups"), ("kind", "kinds")):
        for name, row in metrics.get(key, {}).items():
            lines.append(f"{title} {name:<12} accuracy {row['accuracy']:.2%} (n={row['n']})")
    lines.append(f"note: {metrics.get('note', EASY_NOTE)}")
    return "\n".join(lines)



