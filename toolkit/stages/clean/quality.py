"""Image-quality issues, from the stats computed on the thumbnails already decoded for the embeddings
(embeddings.QUALITY_STATS: no second pass over the files).

Issue kinds (a row's `issues` lists those that hold) and thresholds. The numbers are the 128 px
thumbnail's, measured on ../shared/datasets (percentiles in BENCHMARKS.md, 2026-12-02): clothing-small
(3,409 product photos) brightness 0.15..0.80 (0.5th pct 0.24), Laplacian variance 22..12,900 (0.5th pct
84), entropy 4.1..7.9 bits (0.5th pct 5.6), channel spread 0.003..0.42, aspect 0.43..2.2;
cars-sedan-suv (100 photos, some dark or interior) brightness 0.07..0.62 with 3% below 0.10,
aspect 0.56..2.4, pixels 50k..360k.

- `dark`: mean brightness < DARK (0.15: cars' night/interior shots, no clothing photo);
- `light`: mean brightness > LIGHT (0.85: above every real photo measured; a blank white page is 1.0);
- `blurry`: variance of the Laplacian < BLURRY (60) and < a quarter of the set's median (so a set of
  small upscaled images, such as Fashion-MNIST, is not all blurry);
- `low_information`: grey-level entropy < LOW_ENTROPY bits (4.5) and < 0.6 x the set's median;
- `odd_size`: pixel count < the set's median / ODD_SIZE or > median x ODD_SIZE (4);
- `odd_aspect`: long side / short side > ODD_ASPECT (2.5; the widest real photo measured is 2.4);
- `grayscale`: mean channel spread < GRAYSCALE (0.005) in a set whose median spread is > 0.03
  (grey images among colour ones; a grey data set flags nothing).

CleanVision (cleanlab's) computes the same kinds but decodes every image again in its own pass; these
stats come free with the embedding pass and are cached with it, so we do not add it.

Rows (Rankings.quality, report-quality.csv, report.json "all".quality): `file`, `given`, `split`,
`issues` (list of kind names, most severe first; CSV: joined by ";"), and the stats `brightness`,
`blur`, `entropy`, `colourfulness`, `width`, `height`. Images with issues come first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from toolkit.stages.clean.embeddings import QUALITY_STATS

DARK, LIGHT = 0.15, 0.85
BLURRY, BLURRY_OF_MEDIAN = 60.0, 0.25
LOW_ENTROPY, LOW_ENTROPY_OF_MEDIAN = 4.5, 0.6
ODD_SIZE = 4.0
ODD_ASPECT = 2.5
GRAYSCALE, COLOUR_SET = 0.005, 0.03
KINDS = ("dark", "light", "blurry", "low_information", "odd_size", "odd_aspect", "grayscale")


def quality_flags(stats: np.ndarray) -> dict[str, np.ndarray]:
    """One boolean mask per issue kind (KINDS) over (n, len(QUALITY_STATS)) stats; NaN rows flag nothing."""
    col = {name: stats[:, j].astype(np.float64) for j, name in enumerate(QUALITY_STATS)}
    valid = ~np.isnan(stats).any(axis=1)
    if not valid.any():
        return {kind: np.zeros(len(stats), dtype=bool) for kind in KINDS}

    def median(name: str) -> float:
        return float(np.median(col[name][valid]))

    with np.errstate(invalid="ignore", divide="ignore"):
        pixels = col["width"] * col["height"]
        aspect = np.maximum(col["width"], col["height"]) / np.maximum(np.minimum(col["width"], col["height"]), 1)
        med_pixels = float(np.median(pixels[valid]))
        flags = {
            "dark": col["brightness"] < DARK,
            "light": col["brightness"] > LIGHT,
            "blurry": (col["blur"] < BLURRY) & (col["blur"] < BLURRY_OF_MEDIAN * median("blur")),
            "low_information": (col["entropy"] < LOW_ENTROPY)
            & (col["entropy"] < LOW_ENTROPY_OF_MEDIAN * median("entropy")),
            "odd_size": (pixels < med_pixels / ODD_SIZE) | (pixels > med_pixels * ODD_SIZE),
            "odd_aspect": aspect > ODD_ASPECT,
            "grayscale": (col["colourfulness"] < GRAYSCALE) & (median("colourfulness") > COLOUR_SET),
        }
    return {kind: mask & valid for kind, mask in flags.items()}


def quality_table(rel: Sequence[str], labels: Sequence[str], splits: Sequence[str],
                  stats: np.ndarray) -> list[dict[str, Any]]:
    """Every image with its quality issues and stats (see the module docstring); flagged images first
    (most issues first, then by file name)."""
    flags = quality_flags(stats)
    rows = []
    for i in range(len(rel)):
        row: dict[str, Any] = {"file": rel[i], "given": labels[i], "split": splits[i],
                               "issues": [kind for kind in KINDS if flags[kind][i]]}
        for j, name in enumerate(QUALITY_STATS):
            value = float(stats[i, j])
            row[name] = None if np.isnan(value) else round(value, 4)
        rows.append(row)
    rows.sort(key=lambda r: (-len(r["issues"]), not r["issues"], r["file"]))
    return rows
