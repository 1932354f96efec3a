"""task = pairs (shoe pairs): do two single-shoe photos come from the same pair?

Data is a folder of single-shoe photos plus a naming rule (`pair_rule`, a regex with the named
groups person, pair, side, group), e.g. `u001_2_left_w.jpg`. The package's parts: `data` (photos,
people held out whole, balanced pairs), `model` (stacked and siamese networks, DataLoaders),
`predictor` (`PairPredictor`, figures overall / per group / per kind), `train` (both approaches,
the better one served), `dashboard` (two uploads). `PairsTask` below is its door in the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.core.backbones import get_backbone, head_taps
from toolkit.core.config import ClassifierSpec, Key, choice, compile_regex, parse_fraction, parse_positive_int
from toolkit.core.images import to_batch
from toolkit.data import balanced
from toolkit.tasks.base import Task
from toolkit.tasks.registry import register

# shoe-pairs names: u001_2_left_w.jpg = person u001, pair 2, left shoe, women's
DEFAULT_PAIR_RULE = r"^(?P<person>[^_]+)_(?P<pair>[^_]+)_(?P<side>left|right)_(?P<group>[^_.]+)\."
PAIR_RULE_GROUPS = ("person", "pair", "side", "group")


def parse_pair_rule(value: str) -> str:
    pattern = value.strip()
    compiled = compile_regex(pattern)
    missing = [name for name in PAIR_RULE_GROUPS if name not in compiled.groupindex]
    if missing:
        raise ValueError(f"the regex needs the named groups {', '.join(f'(?P<{m}>...)' for m in missing)}")
    return pattern


class PairsTask(Task):
    """Two photos in, same pair or not out: stacked and siamese models, people held out whole."""

    name = "pairs"
    summary = "two photos in: the same pair or not (stacked and two-input models)"
    n_inputs = 2
    data_hint = "a folder of photos named by pair_rule"
    supports = frozenset({"sweep", "check"})
    keys = {
        "pair_rule": Key(parse_pair_rule, DEFAULT_PAIR_RULE,
                         "task = pairs: regex on photo names with named groups person, pair, side (left|right), group"),
        "approach": Key(choice("stacked", "siamese", "both"), "both",
                        "task = pairs: stacked (one image), siamese (two inputs) or both (each in "
                        "models/NAME/<approach>/, the better one served)"),
        "negatives": Key(parse_positive_int, "1", "task = pairs: negative pairs per positive pair"),
        "hard_share": Key(parse_fraction, "0.5", "task = pairs: share of negatives that are hard (the same person's "
                          "other pairs); the rest are easy (other people)"),
        "hard_weight": Key(parse_positive_int, "1", "task = pairs: training weight of hard negatives (each hard "
                           "training pair seen this many times an epoch: the model must tell pairs, not people, "
                           "apart); validation is unweighted"),
    }

    def train(self, spec, data=None, *, out=None, progress=True, log=print, callbacks=()):
        from toolkit.tasks.pairs.train import train_pairs

        return train_pairs(spec, data, out=out, progress=progress, log=log, callbacks=callbacks)

    def result_keys(self) -> tuple[str, ...]:
        return ("accuracy", "n", "groups", "kinds", "kinds_by_group", "chosen", "approaches")

    def card_rows(self, meta: dict[str, Any], metrics: dict[str, Any]) -> list[tuple[str, str]]:
        """Per group (e.g. m / w): validation accuracy on positives, hard and easy negatives."""
        by = metrics.get("kinds_by_group", {})
        groups = sorted({key.split("/", 1)[1] for key in by if "/" in key})

        def row(group: str) -> str:
            cells = [(kind, by[f"{kind}/{group}"]) for kind in ("positive", "hard", "easy") if f"{kind}/{group}" in by]
            return ", ".join(f"{kind} {r['accuracy']:.1%} (n={r['n']})" for kind, r in cells)

        return [(f"group {group} by kind", row(group)) for group in groups]

    def predictor(self, folder: Path, meta: dict[str, Any], *, device=None, optimize=False):
        from toolkit.tasks.pairs.predictor import PairPredictor

        return PairPredictor(folder, device=device, optimize=optimize, task=self, meta=meta)

    def evaluate(self, predictor, folder: Path, spec: ClassifierSpec, *, tta=False, progress=True) -> dict:
        from toolkit.tasks.pairs.predictor import evaluate_pairs

        return evaluate_pairs(predictor, Path(folder), spec, progress=progress)

    def report(self, metrics: dict) -> str:
        from toolkit.tasks.pairs.predictor import format_pairs_report

        return format_pairs_report(metrics)

    def make_dashboard(self, spec: ClassifierSpec):
        from toolkit.tasks.pairs.dashboard import PairDashboard

        return PairDashboard(spec)

    def check_batches(self, spec, data, n, approach, progress=False):
        import torch

        from toolkit.tasks.pairs.data import load_pair_data
        from toolkit.tasks.pairs.model import create_pair_model, decode_pairs, stack_pair

        backbone = get_backbone(spec.arch)
        approaches = [approach] if approach else (["stacked", "siamese"] if spec.approach == "both"
                                                  else [spec.approach])
        pairs = balanced(load_pair_data(spec, data, progress=progress).train, lambda p: p.same, n, spec.seed)
        arrays = decode_pairs(pairs, spec.size, progress=progress)
        targets = torch.tensor([int(p.same) for p in pairs])
        out = []
        for one in approaches:
            if one == "stacked":
                inputs = (to_batch([stack_pair(arrays[p.a], arrays[p.b], spec.size) for p in pairs],
                                   backbone.mean, backbone.std),)
            else:
                inputs = tuple(to_batch([arrays[getattr(p, side)] for p in pairs], backbone.mean, backbone.std)
                               for side in ("a", "b"))
            model = create_pair_model(one, spec.arch, spec.pretrained, head_taps(spec.arch, spec.head_features))
            out.append((model, inputs, targets, f"{spec.name} ({one})"))
        return out


register(PairsTask())
