"""Shoe pairs (`task = pairs`): do two single-shoe photos come from the same pair?

Data is a folder of single-shoe photos plus a naming rule (`pair_rule`, a regex with the named
groups person, pair, side, group), e.g. `u001_2_left_w.jpg`. From it:

- `parse_photos` -> `Photo`s (verified with the one image opener; bad files listed, left out);
- `split_people` holds out whole people (stratified by their groups): no person is in both train
  and valid, so no shoe (or background, or floor) is seen on both sides;
- `build_pairs` -> labelled `Pair`s, balanced and seeded: positives (left + right of one pair),
  hard negatives (a left and a right of two different pairs of the same person and group) and
  easy negatives (two people of the same group);
- two approaches, both fastai Learners over the registry's pretrained bodies, trained with the
  shared `make_learner` / `fit_learner` (lr_find, fine_tune, best epoch, CSV log):
  **stacked** (`stack_pair`: the two photos side by side, squished to one size x size image, then
  the usual single-input classifier) and **siamese** (`SiameseModel`: one shared encoder, a head
  on the order-free combination f1 + f2, |f1 - f2|, f1 * f2);
- `PairPredictor` loads the pickle-free export without fastai; `score_pairs` computes every
  figure (overall, per group, per kind) through `evaluate.metrics_from_probs`.

Torch is imported at module level (the predictor needs it); fastai only inside training functions.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from toolkit.core.errors import ToolkitError
from toolkit.core.images import BadImage, ImageSource, is_image_name, open_image, verify_images
from toolkit.model_io import (
    META_FILE,
    WEIGHTS_FILE,
    ConcatPool,
    FlattenBatch,
    Predictor,
    inference_body,
    inference_model,
    linear_head,
)
from toolkit.settings import ClassifierSpec

LABELS = ["different", "same"]  # the classes, in the models' output order
KINDS = ("positive", "hard", "easy")
SIDES = ("left", "right")
APPROACHES = ("stacked", "siamese")
EASY_NOTE = ("easy negatives pair two different people, whose photos differ in background and light: "
             "they are close to trivial; hard negatives (the same person's other pairs) are the real test")


@dataclass(frozen=True)
class Photo:
    """One single-shoe photo and what its name says."""

    path: Path
    person: str
    pair: str
    side: str
    group: str


@dataclass(frozen=True)
class Pair:
    """Two photos (a left shoe `a`, a right shoe `b`) and whether they are one pair."""

    a: Path
    b: Path
    same: bool
    kind: str  # positive, hard or easy
    group: str
    people: tuple[str, ...]

    @property
    def label(self) -> str:
        return LABELS[int(self.same)]


# ---------------------------------------------------------------- photos, splits, pairs


def parse_photos(folder: Path, rule: str, *, where: str = "pair_rule",
                 progress: bool = False) -> tuple[list[Photo], list[BadImage]]:
    """Every image under `folder` parsed with `rule`; unreadable files are returned apart."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ToolkitError(f"pairs data folder {folder} not found")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_name(p))
    if not files:
        raise ToolkitError(f"no image files in {folder} (expected single-shoe photos named by {where})")
    regex = re.compile(rule)
    unmatched = [f for f in files if not regex.search(f.name)]
    if unmatched:
        raise ToolkitError(f"{len(unmatched)} file(s) in {folder} do not match {where} (e.g. {unmatched[0].name}): "
                           "fix the regex in settings.ini or move those files out")
    good, bad = verify_images(files, progress=progress)
    photos, seen = [], {}
    for path in good:
        found = regex.search(path.name).groupdict()
        side = found["side"].lower()
        if side not in SIDES:
            raise ToolkitError(f"{path.name}: {where} gives side {found['side']!r}; it must be left or right")
        photo = Photo(path, found["person"], found["pair"], side, found["group"])
        key = (photo.person, photo.pair, photo.side)
        if key in seen:
            raise ToolkitError(f"{path.name} and {seen[key].name} are both person {photo.person}, pair "
                               f"{photo.pair}, {side} ({where}); keep one")
        seen[key] = path
        photos.append(photo)
    return photos, bad


def complete_pairs(photos: Sequence[Photo]) -> dict[tuple[str, str], tuple[Photo, Photo]]:
    """(person, pair) -> (left, right) for every pair with both shoes, in sorted order."""
    sides: dict[tuple[str, str], dict[str, Photo]] = defaultdict(dict)
    for photo in photos:
        sides[(photo.person, photo.pair)][photo.side] = photo
    return {key: (found["left"], found["right"]) for key, found in sorted(sides.items()) if len(found) == 2}


def _pair_group(left: Photo, right: Photo) -> str:
    return left.group if left.group == right.group else f"{left.group}+{right.group}"


def build_pairs(photos: Sequence[Photo], negatives: int = 1, hard_share: float = 0.5, seed: int = 42) -> list[Pair]:
    """Positives and `negatives` negatives per positive, per group (so every group is balanced):
    `hard_share` of them hard (same person and group, another pair), the rest easy (another person
    of the same group). Where too few hard candidates exist, easy ones fill up. Seeded, shuffled."""
    rng = random.Random(seed)
    shoes = complete_pairs(photos)
    by_group: dict[str, list[tuple[Photo, Photo]]] = defaultdict(list)
    for left, right in shoes.values():
        by_group[_pair_group(left, right)].append((left, right))
    out: list[Pair] = []
    for group, members in sorted(by_group.items()):
        out += [Pair(left.path, right.path, True, "positive", group, (left.person,)) for left, right in members]
        wanted = negatives * len(members)
        hard = [(a[0], b[1]) for a in members for b in members if a[0].person == b[0].person and a is not b]
        rng.shuffle(hard)
        hard = hard[: min(len(hard), round(wanted * hard_share))]
        out += [Pair(left.path, right.path, False, "hard", group, (left.person,)) for left, right in hard]
        easy_needed, easy, tries = wanted - len(hard), set(), 0
        people = {left.person for left, _ in members}
        while len(easy) < easy_needed and len(people) > 1 and tries < 100 * (easy_needed + 1):
            tries += 1
            a, b = rng.choice(members), rng.choice(members)
            if a[0].person != b[0].person:
                easy.add((a[0], b[1]))
        out += [Pair(left.path, right.path, False, "easy", group, (left.person, right.person))
                for left, right in sorted(easy, key=lambda lr: (lr[0].path, lr[1].path))]
    rng.shuffle(out)
    return out


def split_people(photos: Sequence[Photo], valid_pct: float, seed: int) -> set[str]:
    """The people held out for validation: `valid_pct` of each stratum of people with the same set
    of groups (so a small group such as women's shoes is in both train and valid)."""
    groups_of: dict[str, set[str]] = defaultdict(set)
    for photo in photos:
        groups_of[photo.person].add(photo.group)
    strata: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for person, groups in sorted(groups_of.items()):
        strata[tuple(sorted(groups))].append(person)
    rng = random.Random(seed)
    held: set[str] = set()
    for _, people in sorted(strata.items()):
        rng.shuffle(people)
        if len(people) > 1:
            held.update(people[: max(1, round(len(people) * valid_pct))])
    return held


def find_pairs_dir(spec: ClassifierSpec, data: Path | None = None) -> Path:
    """--data, else the `data` key, else cleaned_data/NAME, else scrape/NAME (a flat photo folder)."""
    candidates = [Path(data).resolve()] if data else ([spec.data_dir] if spec.data_dir else [])
    for folder in candidates or [spec.cleaned_dir, spec.scrape_dir]:
        if folder.is_dir():
            return folder
    if candidates:
        raise ToolkitError(f"pairs data folder {candidates[0]} not found ([{spec.name}] data or --data)")
    raise ToolkitError(f"no photos for [{spec.name}]: set `data = FOLDER` in its section or pass --data DIR")


@dataclass
class PairData:
    """A pairs data set: photos, the held-out people, and the train and valid pairs."""

    root: Path
    photos: list[Photo]
    bad: list[BadImage]
    valid_people: set[str]
    train: list[Pair]
    valid: list[Pair]

    def summary(self) -> dict[str, Any]:
        def count(pairs: list[Pair]) -> dict[str, int]:
            return dict(sorted(_counter(f"{p.kind}/{p.group}" for p in pairs).items()))

        people = {p.person for p in self.photos}
        return {"photos": len(self.photos), "people": len(people), "valid_people": len(self.valid_people),
                "train_pairs": len(self.train), "valid_pairs": len(self.valid),
                "train_counts": count(self.train), "valid_counts": count(self.valid)}


def _counter(items) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for item in items:
        counts[item] += 1
    return counts


def load_pair_data(spec: ClassifierSpec, data: Path | None = None, *, progress: bool = True) -> PairData:
    """Parse, verify, split by person (`split`: auto, group:REGEX or folder) and build both pair sets."""
    root = find_pairs_dir(spec, data)
    where = f"[{spec.name}] pair_rule"
    valid_root = next((root / n for n in ("valid", "validation", "val") if (root / n).is_dir()), None)
    if spec.split == "folder" or (spec.split == "auto" and (root / "train").is_dir() and valid_root):
        if not ((root / "train").is_dir() and valid_root):
            raise ToolkitError(f"[{spec.name}] split = folder but {root} has no train/ and valid/ folders")
        train_photos, bad = parse_photos(root / "train", spec.pair_rule, where=where, progress=progress)
        valid_photos, more_bad = parse_photos(valid_root, spec.pair_rule, where=where, progress=progress)
        photos, bad = train_photos + valid_photos, bad + more_bad
        held = {p.person for p in valid_photos}
    elif spec.split.startswith("random"):
        raise ToolkitError(f"[{spec.name}] split = {spec.split} would put one person's shoes in train and valid; "
                           "use split = auto (by person) for task = pairs")
    else:
        photos, bad = parse_photos(root, spec.pair_rule, where=where, progress=progress)
        if spec.split.startswith("group:"):  # the regex's first group names the unit held out
            regex = re.compile(spec.split.split(":", 1)[1])
            units = {p.path: m.group(1) if (m := regex.search(p.path.name)) else p.person for p in photos}
            held_units = split_people([Photo(p.path, units[p.path], p.pair, p.side, p.group) for p in photos],
                                      spec.valid_pct, spec.seed)
            held = {p.person for p in photos if units[p.path] in held_units}
        else:
            held = split_people(photos, spec.valid_pct, spec.seed)
    train_photos = [p for p in photos if p.person not in held]
    valid_photos = [p for p in photos if p.person in held]
    if set(p.person for p in train_photos) & set(p.person for p in valid_photos):
        raise ToolkitError(f"[{spec.name}] split {spec.split} puts a person in both train and valid; "
                           "use split = auto (by person)")
    train = build_pairs(train_photos, spec.negatives, spec.hard_share, spec.seed)
    valid = build_pairs(valid_photos, spec.negatives, spec.hard_share, spec.seed + 1)
    if not train or not valid:
        raise ToolkitError(f"[{spec.name}] {root}: {len(train)} train and {len(valid)} valid pairs; "
                           "need left and right photos of at least two people on each side of the split")
    return PairData(root, photos, bad, held, train, valid)


# ---------------------------------------------------------------- images


def stack_pair(a: np.ndarray, b: np.ndarray, size: int) -> np.ndarray:
    """Photo `a` on the left, `b` on the right (each size x size, uint8 HWC), squished to one
    size x size image: the stacked approach's input, the same at training and serving."""
    both = np.concatenate([a, b], axis=1)
    return np.asarray(Image.fromarray(both).resize((size, size), Image.BILINEAR))


def resized(img: Image.Image, size: int) -> np.ndarray:
    """An RGB image squished to size x size (as `data.load_resized` does for files)."""
    return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))


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
    from toolkit.data import DecodedCache

    return DecodedCache(sorted({p.a for p in pairs} | {p.b for p in pairs}), size, progress=progress).arrays


def pair_dataloaders(pairs: Sequence[Pair], is_valid: Sequence[bool], approach: str, size: int, bs: int,
                     mean, std, *, arrays: dict[Path, np.ndarray] | None = None, seed: int = 42,
                     augment: bool = True, progress: bool = True):
    """fastai DataLoaders over pair indices: stacked -> (image, label); siamese -> (image a, image b,
    label) with n_inp = 2 (the batch transforms move both photos of a pair alike)."""
    from fastai.data.block import CategoryBlock, DataBlock
    from fastai.data.transforms import IndexSplitter
    from fastai.vision.data import ImageBlock

    from toolkit.data import batch_transforms

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
    and f1 * f2, so the prediction does not depend on which photo comes first."""

    def __init__(self, body: nn.Module, n_features: int, n_out: int = 2):
        super().__init__()
        self.body = body
        self.pool = nn.Sequential(ConcatPool(), FlattenBatch())
        self.head = nn.Sequential(*linear_head(3 * 2 * n_features, n_out))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.body(torch.cat([a, b])))  # one pass through the body for both
        fa, fb = features[: len(a)], features[len(a):]
        return self.head(torch.cat([fa + fb, (fa - fb).abs(), fa * fb], dim=1))


def siamese_split(model: SiameseModel) -> list[list[nn.Parameter]]:
    """The same three parameter groups as `backbones.body_head_split` (early body, late body, head)."""
    from toolkit.core.backbones import body_head_split

    return body_head_split(nn.Sequential(model.body, model.head))


def create_pair_model(approach: str, arch: str, pretrained: bool = True) -> nn.Module:
    """A trainable model of either approach from the registry's (pretrained) body."""
    from toolkit.core.backbones import create_model, get_backbone

    if approach == "stacked":
        return create_model(arch, len(LABELS), pretrained=pretrained)
    backbone = get_backbone(arch)
    return SiameseModel(backbone.create_body(pretrained), backbone.n_features, len(LABELS))


# ---------------------------------------------------------------- serving


@dataclass
class PairPrediction:
    same: bool
    probability: float  # of "same pair"
    approach: str

    @property
    def label(self) -> str:
        return "same pair" if self.same else "different pairs"

    def as_dict(self) -> dict[str, Any]:
        return {"same": self.same, "label": self.label, "probability_same": round(self.probability, 5),
                "approach": self.approach}


class PairPredictor(Predictor):
    """models/NAME (task = pairs) without fastai or pickles. `symmetric` (the default) averages the
    stacked model over both orders (a|b and b|a); the siamese model is order-free by design."""

    def build_model(self) -> nn.Module:
        from toolkit.core.backbones import get_backbone

        self.approach = self.meta.get("approach", "")
        if self.approach == "stacked":
            return inference_model(self.meta["arch"], len(self.classes))
        if self.approach == "siamese":
            return SiameseModel(inference_body(self.meta["arch"]), get_backbone(self.meta["arch"]).n_features,
                                len(self.classes))
        raise ToolkitError(f"{self.folder / META_FILE}: unknown pairs approach {self.approach!r}; retrain")

    def _optimized(self) -> None:
        """Pairs serve the eager model (the TorchScript copy is for single-input classifiers)."""
        return None

    def _normalised(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().to(self.device) / 255
        return (batch - self.mean) / self.std

    def predict_arrays(self, a: Sequence[np.ndarray], b: Sequence[np.ndarray], symmetric: bool = True,
                       bs: int = 64) -> np.ndarray:
        """Photos as size x size uint8 arrays (a[i] with b[i]) -> (N, 2) probabilities (different, same)."""
        out = []
        with torch.inference_mode():
            for start in range(0, len(a), bs):
                xa, xb = a[start : start + bs], b[start : start + bs]
                if self.approach == "siamese":
                    probs = self.model(self._normalised(xa), self._normalised(xb)).softmax(dim=1)
                else:
                    probs = self.model(self._normalised([stack_pair(i, j, self.size) for i, j in zip(xa, xb)]))
                    probs = probs.softmax(dim=1)
                    if symmetric:
                        flipped = self._normalised([stack_pair(j, i, self.size) for i, j in zip(xa, xb)])
                        probs = (probs + self.model(flipped).softmax(dim=1)) / 2
                out.append(probs.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def predict_pair(self, a: ImageSource | Image.Image, b: ImageSource | Image.Image,
                     names: tuple[str | None, str | None] = (None, None)) -> PairPrediction:
        """Two photos (paths, bytes, file objects or PIL images) -> same pair or not, with probability."""
        arrays = [resized(src if isinstance(src, Image.Image) else open_image(src, name=name, draft_size=self.size),
                          self.size) for src, name in zip((a, b), names)]
        p_same = float(self.predict_arrays([arrays[0]], [arrays[1]])[0, LABELS.index("same")])
        return PairPrediction(p_same >= 0.5, p_same, self.approach)


def score_pairs(predictor: PairPredictor, pairs: Sequence[Pair], arrays: dict[Path, np.ndarray] | None = None,
                *, symmetric: bool = True, progress: bool = False) -> dict:
    """Accuracy overall, per group and per kind (positive / hard / easy), with the confusion matrix,
    through `metrics_from_probs`; images decoded once at the predictor's size unless given."""
    from toolkit.evaluate import accuracy_by, metrics_from_probs

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


# ---------------------------------------------------------------- training


def _summary(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("accuracy", "n", "groups", "kinds", "learner_accuracy", "fit_seconds",
                                    "wall_seconds", "lr") if k in metrics}


def train_approach(spec: ClassifierSpec, approach: str, pair_data: PairData, out: Path,
                   arrays: dict[Path, np.ndarray] | None = None, *, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict:
    """Train one approach into `out`: lr_find, fine_tune, pickle-free export, plots, metrics.json.
    `arrays` are the photos decoded at spec.size (decoded here when not given)."""
    from fastai.torch_core import set_seed

    from toolkit.core.backbones import body_head_split, get_backbone
    from toolkit.evaluate import plot_confusion
    from toolkit.train import fit_learner, make_learner, plot_losses, plot_top_losses

    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    backbone = get_backbone(spec.arch)
    set_seed(spec.seed)
    pairs = pair_data.train + pair_data.valid
    is_valid = [False] * len(pair_data.train) + [True] * len(pair_data.valid)
    arrays = arrays if arrays is not None else decode_pairs(pairs, spec.size, progress=progress)
    dls = pair_dataloaders(pairs, is_valid, approach, spec.size, spec.bs, backbone.mean, backbone.std,
                           arrays=arrays, seed=spec.seed, progress=progress)
    model = create_pair_model(approach, spec.arch, spec.pretrained)
    splitter = siamese_split if approach == "siamese" else body_head_split
    learn = make_learner(dls, model, out, splitter=splitter, pretrained=spec.pretrained, progress=progress)
    log(f"{approach}: training on {len(pair_data.train)} pairs, validating on {len(pair_data.valid)}")
    fitted = fit_learner(learn, spec, out, log, progress=progress)
    meta = {"task": "pairs", "approach": approach, "name": spec.name, "title": spec.display_title,
            "description": spec.description, "arch": spec.arch, "pretrained": spec.pretrained, "classes": LABELS,
            "size": spec.size, "mean": list(backbone.mean), "std": list(backbone.std),
            "pair_rule": spec.pair_rule, "symmetric": approach == "stacked",
            "data": {"dir": str(pair_data.root), **pair_data.summary()}}
    from toolkit.model_io import export_model

    export_model(learn.model, out, meta)
    # The figures come from the exported model through the serving path (symmetric for stacked).
    predictor = PairPredictor(out, device="cpu")
    metrics = score_pairs(predictor, pair_data.valid, arrays)
    values = learn.recorder.values
    metrics.update({
        "name": spec.name, "approach": approach, "arch": spec.arch, "size": spec.size, "epochs": spec.epochs,
        "freeze_epochs": spec.freeze_epochs, "bs": spec.bs, "lr": fitted["lr"], "lr_mult": spec.lr_mult,
        "lr_find": fitted["lr_find"], "n_train": len(pair_data.train), "n_valid": len(pair_data.valid),
        "learner_accuracy": round(float(max(v[2] for v in values)), 4) if values else None,
        "data": str(pair_data.root), **pair_data.summary(), "bad_files": len(pair_data.bad),
        "fit_seconds": round(fitted["fit_seconds"], 1), "wall_seconds": round(time.time() - started, 1),
        "history": [list(map(float, v)) for v in values],
    })
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_confusion(metrics, out / "confusion_matrix.png", title=f"{spec.name} {approach} validation pairs")
    plot_losses(fitted["history"], out / "losses.png")
    valid = pair_data.valid
    probs = predictor.predict_arrays([arrays[p.a] for p in valid], [arrays[p.b] for p in valid])
    plot_top_losses([stack_pair(arrays[p.a], arrays[p.b], spec.size) for p in valid],
                    [p.label for p in valid], probs, LABELS, out / "top_losses.png")
    log(f"{approach}: valid accuracy {metrics['accuracy']:.2%} on {metrics['n']} pairs; groups "
        + ", ".join(f"{g} {r['accuracy']:.1%}" for g, r in metrics["groups"].items()) + "; kinds "
        + ", ".join(f"{k} {r['accuracy']:.1%}" for k, r in metrics["kinds"].items()))
    return metrics


CHOSEN_FILES = (WEIGHTS_FILE, META_FILE, "lr_find.png", "losses.png", "confusion_matrix.png", "top_losses.png",
                "history.csv")


def train_pairs(spec: ClassifierSpec, data: Path | None = None, *, progress: bool = True,
                log: Callable[[str], None] = print) -> dict:
    """Train `spec.approach` (or both, each into models/NAME/<approach>/, the better one copied to
    models/NAME/ for serving); returns the served model's metrics (also in models/NAME/metrics.json)."""
    started = time.time()
    pair_data = load_pair_data(spec, data, progress=progress)
    summary = pair_data.summary()
    log(f"data: {pair_data.root} - {summary['photos']} photos of {summary['people']} people; "
        f"{summary['train_pairs']} train pairs, {summary['valid_pairs']} valid pairs "
        f"({summary['valid_people']} people held out)")
    if pair_data.bad:
        log(f"warning: left out {len(pair_data.bad)} unreadable file(s); first: {pair_data.bad[0].reason}")
    out = spec.models_dir
    out.mkdir(parents=True, exist_ok=True)
    arrays = decode_pairs(pair_data.train + pair_data.valid, spec.size, progress=progress)
    if spec.approach != "both":
        return train_approach(spec, spec.approach, pair_data, out, arrays, progress=progress, log=log)
    results = {a: train_approach(spec, a, pair_data, out / a, arrays, progress=progress, log=log)
               for a in APPROACHES}
    # The better validation accuracy wins; ties go to the siamese model (order-free, one pass).
    chosen = max(APPROACHES, key=lambda a: (results[a]["accuracy"], a == "siamese"))
    for name in CHOSEN_FILES:
        if (out / chosen / name).is_file():
            shutil.copy2(out / chosen / name, out / name)
    metrics = dict(results[chosen])
    metrics.update({"chosen": chosen, "approaches": {a: _summary(r) for a, r in results.items()},
                    "wall_seconds": round(time.time() - started, 1)})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"chosen: {chosen} (" + ", ".join(f"{a} {r['accuracy']:.2%}" for a, r in results.items())
        + f"); wrote {out}")
    return metrics
