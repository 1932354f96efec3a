"""Benchmark: shoe pairs, stacked vs siamese, on a person-level split of shoe-pairs/train.

`toolkit train` with task = pairs and approach = both on ../shared/datasets/shoe-pairs/train:
people held out whole (stratified by men's / women's), balanced pairs (half the negatives hard:
the same person's other pairs). Prints, per approach, validation accuracy overall, on men's and
women's pairs, on positives, hard and easy negatives (also per group), and wall time; for the
stacked model also without the symmetric (a|b and b|a) average. Targets (issue 16) for the better
approach: women's >= 88%, men's >= 90%, hard negatives >= 70% in each group (the reference
reports 85% women, 76% men). Last line: RESULT {json}.

Usage: python bench/pairs.py [--size N] [--epochs N] [--freeze-epochs N] [--arch A] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "shoe-pairs" / "train"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--freeze-epochs", type=int, default=1)
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--set", action="append", default=[], help="extra settings.ini lines, key=value")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"missing {DATA}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from toolkit.settings import load_settings
    from toolkit.stages.train import train
    from toolkit.tasks.pairs.predictor import PairPredictor, score_pairs

    keys = {"task": "pairs", "approach": "both", "data": str(DATA), "size": args.size, "epochs": args.epochs,
            "freeze_epochs": args.freeze_epochs, "bs": args.bs, "valid_pct": 0.25, "arch": args.arch}
    keys.update({line.split("=", 1)[0].strip(): line.split("=", 1)[1].strip() for line in args.set})  # --set wins
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "settings.ini").write_text("[shoes]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
        spec = load_settings(root / "settings.ini").get("shoes")
        started = time.time()
        metrics = train(spec, progress=False, log=lambda line: print("  toolkit:", line, flush=True))
        wall = time.time() - started
        per = {}
        approaches = metrics.get("approaches") or {metrics["approach"]: metrics}  # approach = both, or one
        for approach, summary in approaches.items():
            row = {"accuracy": summary["accuracy"], "men": summary["groups"].get("m", {}).get("accuracy"),
                   "women": summary["groups"].get("w", {}).get("accuracy"),
                   **{kind: summary["kinds"].get(kind, {}).get("accuracy") for kind in ("positive", "hard", "easy")},
                   **{f"{kind}_{g}": summary.get("kinds_by_group", {}).get(f"{kind}/{g}", {}).get("accuracy")
                      for kind in ("positive", "hard", "easy") for g in ("m", "w")},
                   "wall_s": summary["wall_seconds"], "fit_s": summary["fit_seconds"], "lr": summary["lr"]}
            if approach == "stacked":  # the same model without the symmetric average
                from toolkit.tasks.pairs.data import load_pair_data

                one_way = score_pairs(PairPredictor(spec.models_dir / approach, device="cpu"),
                                      load_pair_data(spec, progress=False).valid, symmetric=False)
                row["accuracy_one_order"] = one_way["accuracy"]
            per[approach] = row
        counts = metrics["valid_counts"]
    print(f"\nshoe-pairs: {metrics['people']} people, {metrics['valid_people']} held out; "
          f"{metrics['train_pairs']} train pairs, {metrics['valid_pairs']} valid pairs {counts}")
    header = ("approach", "overall", "men", "women", "positive", "hard", "easy", "wall s")
    print(f"{header[0]:<9} " + " ".join(f"{h:>{9 if h == 'positive' else 7}}" for h in header[1:]))
    for approach, row in per.items():
        print(f"{approach:<9} {row['accuracy']:>8.1%} {row['men']:>7.1%} {row['women']:>7.1%} "
              f"{row['positive']:>9.1%} {row['hard']:>7.1%} {row['easy']:>7.1%} {row['wall_s']:>7.0f}")
    for approach, row in per.items():
        print(f"{approach:<9} by group: " + "; ".join(
            f"{g}: " + ", ".join(f"{kind} {row[f'{kind}_{g}']:.1%}" for kind in ("positive", "hard", "easy")
                                 if row[f"{kind}_{g}"] is not None) for g in ("m", "w")))
    if "accuracy_one_order" in per.get("stacked", {}):
        print(f"stacked without the symmetric average: {per['stacked']['accuracy_one_order']:.1%}")
    chosen = metrics.get("chosen", metrics["approach"])
    best = per[chosen]
    met = ((best["women"] or 0) >= 0.88 and (best["men"] or 0) >= 0.90
           and min(best["hard_m"] or 0, best["hard_w"] or 0) >= 0.70)
    baseline = (best["women"] or 0) > 0.85 and (best["men"] or 0) > 0.76
    print(f"winner: {chosen}; target (women >= 88%, men >= 90%, hard >= 70% each): {'met' if met else 'NOT met'}; "
          f"the reference (women 85%, men 76%): {'beaten' if baseline else 'NOT beaten'}; total wall {wall:.0f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB")
    result = {"size": args.size, "epochs": args.epochs, "freeze_epochs": args.freeze_epochs, "bs": args.bs,
              "settings": args.set, "valid_pairs": metrics["valid_pairs"], "valid_people": metrics["valid_people"],
              "approaches": per, "winner": chosen, "target_met": met, "reference_beaten": baseline, "arch": args.arch,
              "wall_s": round(wall, 1), "peak_rss_mb": round(peak)}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
