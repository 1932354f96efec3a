"""task = pairs, models: the **stacked** approach (`stack_pair`: both photos side by side, squished to
one image, then the usual single-input classifier) and the **siamese** one (`SiameseModel`: one
shared encoder, a head on the order-free combination f1 + f2, |f1 - f2|, f1 * f2); their fastai
DataLoaders over pairs (a decoded cache; the batch transforms move both photos of a pair alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from toolkit.core.backbones import (
    ConcatPool,
    FlattenBatch,
    MultiPool,
    TapBody,
    body_head_split,
    create_model,
    get_backbone,
    linear_head,
    tap_channels,
)
from toolkit.data import DecodedCache, batch_transforms
from toolkit.tasks.pairs.data import LABELS, Pair

# ---------------------------------------------------------------- images


def stack_pair(a: np.ndarray, b: np.ndarray, size: int) -> np.ndarray:
    """Photo `a` on the left, `b` on the right (each size x size, uint8 HWC), squished to one
    size x size image: the stacked approach's input, the same at training and serving."""
    both = np.concatenate([a, b], axis=1)
    return np.asarray(Image.fromarray(both).resize((size, size), Image.BILINEAR))




class _PairGetter:
    """Picklable fastai getter over pairs (item = index) and a decoded cache: `part` is "stacked",
    "a", "b" (the two photos) or "label"."""

    def __init__(self, pairs: Sequence[Pair], arrays: dict[Path, np.ndarray], size: int, part: str):
        self.pairs, self.arrays, self.size, self.part = pairs, arrays, size, part

    def __call__(self, index: int):
        pair = self.pairs[index]
        if self.part == "label":
            return pair.label
        from fastai.vision.core import PILImage

        if self.part == "stacked":
            return PILImage.create(stack_pair(self.arrays[pair.a], self.arrays[pair.b], self.size))
        return PILImage.create(self.arrays[pair.a if self.part == "a" else pair.b])


def decode_pairs(pairs: Sequence[Pair], size: int, *, progress: bool = False) -> dict[Path, np.ndarray]:
    """Every photo of `pairs` decoded and squished once (a `DecodedCache`): path -> uint8 array."""
    return DecodedCache(sorted({p.a for p in pairs} | {p.b for p in pairs}), size, progress=progress).arrays


def pair_dataloaders(pairs: Sequence[Pair], is_valid: Sequence[bool], approach: str, size: int, bs: int,
                     mean, std, *, arrays: dict[Path, np.ndarray] | None = None, seed: int = 42,
                     augment: bool = True, progress: bool = True):
    """fastai DataLoaders over pair indices: stacked -> (image, label); siamese -> (image a, image b,
    label) with n_inp = 2 (the batch transforms move both photos of a pair alike)."""
    from fastai.data.block import CategoryBlock, DataBlock
    from fastai.data.transforms import IndexSplitter
    from fastai.vision.data import ImageBlock

    arrays = arrays if arrays is not None else decode_pairs(pairs, size, progress=progress)
    label = CategoryBlock(vocab=LABELS)
    if approach == "stacked":
        blocks, getters, n_inp = (ImageBlock, label), ["stacked", "label"], 1
    else:
        blocks, getters, n_inp = (ImageBlock, ImageBlock, label), ["a", "b", "label"], 2
    block = DataBlock(blocks=blocks, getters=[_PairGetter(pairs, arrays, size, part) for part in getters],
                      n_inp=n_inp, splitter=IndexSplitter([i for i, v in enumerate(is_valid) if v]),
                      batch_tfms=batch_transforms(size, mean, std, augment))
    return block.dataloaders(list(range(len(pairs))), bs=bs, num_workers=0, seed=seed)


# ---------------------------------------------------------------- models


class SiameseModel(nn.Module):
    """One shared encoder (body + concat pooling) for both photos; the head sees f1 + f2, |f1 - f2|
    and f1 * f2, so the prediction does not depend on which photo comes first. With `taps` the encoder
    also pools the body's inner stages (`backbones.TapBody`, `MultiPool`), as the one-image models do."""

    def __init__(self, body: nn.Module, n_features: int, n_out: int = 2, taps: tuple[str, ...] = ()):
        super().__init__()
        n_pooled = 2 * n_features + (tap_channels(body, taps) if taps else 0)
        self.body = TapBody(body, taps) if taps else body
        self.pool = nn.Sequential(MultiPool() if taps else ConcatPool(), FlattenBatch())
        self.head = nn.Sequential(*linear_head(3 * n_pooled, n_out))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.body(torch.cat([a, b])))  # one pass through the body for both
        fa, fb = features[: len(a)], features[len(a):]
        return self.head(torch.cat([fa + fb, (fa - fb).abs(), fa * fb], dim=1))


def siamese_split(model: SiameseModel) -> list[list[nn.Parameter]]:
    """The same three parameter groups as `backbones.body_head_split` (early body, late body, head)."""

    return body_head_split(nn.Sequential(model.body, model.head))


def create_pair_model(approach: str, arch: str, pretrained: bool = True, taps: tuple[str, ...] = ()) -> nn.Module:
    """A trainable model of either approach from the registry's (pretrained) body; `taps` as in
    `backbones.create_model`."""

    if approach == "stacked":
        return create_model(arch, len(LABELS), pretrained=pretrained, taps=taps)
    backbone = get_backbone(arch)
    return SiameseModel(backbone.create_body(pretrained), backbone.n_features, len(LABELS), taps=taps)


