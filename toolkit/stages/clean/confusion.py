"""Class-confusion report: the class pairs with most off-diagonal mass in cleanlab's confident joint
(`cleanlab.count.compute_confident_joint` over the out-of-fold probabilities), as Cleanlab Studio's
"classes to merge or rename".

Rows (Rankings.confusion, report-confusion.csv, report.json "confusion"), largest mass first:
`classes` [a, b]; `a_as_b` / `b_as_a`: images given a (b) whose likely true class is b (a);
`a_as_b_share` / `b_as_a_share`: those counts over the images given a (b); `mass`: (a_as_b + b_as_a)
over all images; `examples_a_as_b` / `examples_b_as_a`: up to EXAMPLES files, most confident first;
`merge`: both shares >= MERGE_SHARE (the two classes are mixed up both ways: merge or redefine them?).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

EXAMPLES = 4
MERGE_SHARE = 0.15
TOP_PAIRS = 10


def confusion_pairs(rel: Sequence[str], y: np.ndarray, classes: Sequence[str], probs: np.ndarray,
                    scorable: np.ndarray, *, top: int = TOP_PAIRS) -> list[dict[str, Any]]:
    """The `top` class pairs with off-diagonal confident-joint mass (see the module docstring);
    `scorable` lists the class indices that took part in out-of-fold scoring ([] = no report)."""
    from cleanlab.count import compute_confident_joint

    if len(scorable) < 2:
        return []
    inside = np.flatnonzero(np.isin(y, scorable))
    remap = np.full(len(classes), -1)
    remap[scorable] = np.arange(len(scorable))
    y_sub = remap[y[inside]]
    p_sub = probs[inside][:, scorable]
    p_sub = p_sub / p_sub.sum(axis=1, keepdims=True)
    try:
        joint = compute_confident_joint(y_sub, p_sub)
    except Exception:  # noqa: BLE001 - degenerate sets: no report rather than a failed run
        return []
    counts = np.bincount(y_sub, minlength=len(scorable)).astype(float)
    pred = p_sub.argmax(axis=1)
    pairs = []
    for a in range(len(scorable)):
        for b in range(a + 1, len(scorable)):
            ab, ba = int(joint[a, b]), int(joint[b, a])
            if ab + ba == 0:
                continue

            def examples(given: int, likely: int) -> list[str]:
                hit = np.flatnonzero((y_sub == given) & (pred == likely))
                hit = hit[np.argsort(-p_sub[hit, likely], kind="stable")][:EXAMPLES]
                return [rel[inside[i]] for i in hit]

            sab, sba = ab / max(counts[a], 1), ba / max(counts[b], 1)
            pairs.append({"classes": [classes[scorable[a]], classes[scorable[b]]], "a_as_b": ab, "b_as_a": ba,
                          "a_as_b_share": round(sab, 4), "b_as_a_share": round(sba, 4),
                          "mass": round((ab + ba) / max(len(y_sub), 1), 5),
                          "examples_a_as_b": examples(a, b), "examples_b_as_a": examples(b, a),
                          "merge": bool(sab >= MERGE_SHARE and sba >= MERGE_SHARE)})
    pairs.sort(key=lambda p: -p["mass"])
    return pairs[:top]
