"""task = pairs, data: photos named by `pair_rule` -> people held out whole -> balanced, seeded pairs.

- `parse_photos` -> `Photo`s (verified with the one image opener; bad files listed, left out);
- `split_people` holds out whole people (stratified by their groups): no person is in both train
  and valid, so no shoe (or background, or floor) is seen on both sides;
- `build_pairs` -> labelled `Pair`s: positives (left + right of one pair), hard negatives (a left and
  a right of two different pairs of the same person and group) and easy negatives (two people of
  the same group).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.core.config import ClassifierSpec, group_of
from toolkit.core.errors import ToolkitError
from toolkit.core.images import BadImage, is_image_name, verify_images
from toolkit.data import find_data_dir, valid_folder

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




def weight_hard(pairs: Sequence[Pair], weight: int, seed: int = 42) -> list[Pair]:
    """Training pairs with every hard negative repeated `weight` times (a loss weight by
    repetition), shuffled again; weight 1 leaves them as they are."""
    if weight <= 1:
        return list(pairs)
    out = [p for p in pairs for _ in range(weight if p.kind == "hard" else 1)]
    random.Random(seed).shuffle(out)
    return out


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
    root = find_data_dir(spec, data, accept=Path.is_dir, expected="a folder of photos named by pair_rule")
    where = f"[{spec.name}] pair_rule"
    rule = spec.split_rule
    valid_root = valid_folder(root)
    if rule.kind == "folder" or (rule.uses_folders and (root / "train").is_dir() and valid_root):
        if not ((root / "train").is_dir() and valid_root):
            raise ToolkitError(f"[{spec.name}] split = folder but {root} has no train/ and valid/ folders")
        train_photos, bad = parse_photos(root / "train", spec.pair_rule, where=where, progress=progress)
        valid_photos, more_bad = parse_photos(valid_root, spec.pair_rule, where=where, progress=progress)
        photos, bad = train_photos + valid_photos, bad + more_bad
        held = {p.person for p in valid_photos}
    elif rule.kind == "random":
        raise ToolkitError(f"[{spec.name}] split = {spec.split} would put one person's shoes in train and valid; "
                           "use split = auto (by person) for task = pairs")
    else:
        photos, bad = parse_photos(root, spec.pair_rule, where=where, progress=progress)
        if rule.kind == "group":  # the regex's first group names the unit held out
            units = {p.path: group_of(rule.pattern, p.path.name) or p.person for p in photos}
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
    train = weight_hard(build_pairs(train_photos, spec.negatives, spec.hard_share, spec.seed),
                        spec.options.get("hard_weight", 1), spec.seed)
    valid = build_pairs(valid_photos, spec.negatives, spec.hard_share, spec.seed + 1)
    if not train or not valid:
        raise ToolkitError(f"[{spec.name}] {root}: {len(train)} train and {len(valid)} valid pairs; "
                           "need left and right photos of at least two people on each side of the split")
    return PairData(root, photos, bad, held, train, valid)


